"""Seed entry points for backend configuration: ``get_nats_config``, ``get_kafka_config``.

:func:`backend_config` is what ``get_pubsub()`` and ``get_async_pubsub()`` share:
the settings object each backend's constructor takes, read from ``MSIGHT_*``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..config import (
    KafkaConfig,
    NatsConfig,
    load_kafka_config,
    load_nats_config,
    load_queue_config,
    load_redis_config,
    load_shm_config,
)

__all__ = ["backend_config", "get_kafka_config", "get_nats_config"]

logger = logging.getLogger(__name__)


def get_nats_config(
    group_id: str | None = None, env: Mapping[str, str] | None = None, **overrides: Any
) -> NatsConfig:
    """NATS settings from ``MSIGHT_NATS_*``; ``group_id`` selects a queue group.

    Raises:
        ConfigError: a variable is malformed (the message names it).
    """
    return load_nats_config(group_id=group_id, env=env, **overrides)


def get_kafka_config(
    group_id: str | None = None, env: Mapping[str, str] | None = None, **overrides: Any
) -> KafkaConfig:
    """Kafka settings from ``MSIGHT_KAFKA_*``; ``group_id`` names the consumer group.

    Raises:
        ConfigError: a variable is malformed (the message names it).
    """
    return load_kafka_config(group_id=group_id, env=env, **overrides)


def backend_config(name: str, group_id: str | None, env: Mapping[str, str] | None) -> Any:
    """The settings backend ``name`` is built with, from ``MSIGHT_*`` (or ``env``).

    ``redis`` gives a ``RedisConfig`` (and notes that a ``group_id`` is ignored:
    Redis pub/sub has no groups), ``nats``/``kafka`` their configs with the group,
    ``shm`` a ``ShmConfig``, ``memory`` the receive-queue limits.

    Raises:
        ConfigError: a variable is malformed (the message names it).
    """
    if name == "redis":
        if group_id is not None:
            logger.info(
                "group_id %r ignored: Redis pub/sub has no groups (every subscriber gets "
                "every message); use nats or kafka for load balancing",
                group_id,
            )
        return load_redis_config(env)
    if name == "nats":
        return get_nats_config(group_id, env=env)
    if name == "kafka":
        return get_kafka_config(group_id, env=env)
    if name == "shm":
        return load_shm_config(env)
    return load_queue_config(env)
