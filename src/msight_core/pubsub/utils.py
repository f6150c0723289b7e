"""Seed entry points for backend configuration: ``get_nats_config``, ``get_kafka_config``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import KafkaConfig, NatsConfig, load_kafka_config, load_nats_config

__all__ = ["get_kafka_config", "get_nats_config"]


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
