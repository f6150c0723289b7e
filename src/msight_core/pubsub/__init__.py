"""Pub/sub backends behind one interface, chosen with ``MSIGHT_PUBSUB_BACKEND``.

Backends are imported lazily: ``from msight_core.pubsub import RedisPubSub``
imports redis support only, never nats or confluent_kafka.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..config import backend_name
from .base import Capabilities, Message, PubSubBackend

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .kafka import KafkaPubSub
    from .memory import MemoryPubSub
    from .nats import NATSPubSub
    from .redis import RedisPubSub
    from .shm import ShmPubSub

__all__ = [
    "Capabilities",
    "KafkaPubSub",
    "MemoryPubSub",
    "Message",
    "NATSPubSub",
    "PubSubBackend",
    "RedisPubSub",
    "ShmPubSub",
    "get_pubsub",
]

_LAZY = {
    "RedisPubSub": ".redis",
    "NATSPubSub": ".nats",
    "KafkaPubSub": ".kafka",
    "MemoryPubSub": ".memory",
    "ShmPubSub": ".shm",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def get_pubsub(group_id: str | None = None, env: Mapping[str, str] | None = None) -> PubSubBackend:
    """Build the backend named by ``MSIGHT_PUBSUB_BACKEND`` (default ``redis``).

    Args:
        group_id: load-balancing group (NATS queue group, Kafka consumer group,
            memory or shm group). Redis has no groups: every subscriber gets everything.
        env: environment mapping to read instead of ``os.environ``.

    Raises:
        ConfigError: unknown backend name or invalid ``MSIGHT_*`` value.
        MissingDependencyError: the backend's extra is not installed.
    """
    from .utils import backend_config

    name = backend_name(env)
    config = backend_config(name, group_id, env)
    if name == "redis":
        from .redis import RedisPubSub

        return RedisPubSub(config)
    if name == "nats":
        from .nats import NATSPubSub

        return NATSPubSub(config)
    if name == "kafka":
        from .kafka import KafkaPubSub

        return KafkaPubSub(config)
    if name == "shm":
        from .shm import ShmPubSub

        return ShmPubSub(config, group_id=group_id)
    from .memory import MemoryPubSub

    return MemoryPubSub(group_id=group_id, queue=config)
