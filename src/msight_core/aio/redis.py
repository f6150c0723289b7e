"""``AsyncRedisPubSub``: the asyncio twin of :class:`~msight_core.pubsub.RedisPubSub`.

The same wire, threads and guarantees as the synchronous backend (one server
or a cluster, best-effort broadcast, no groups): its reader thread hands
received batches to the loop, its writer thread sends what ``publish()``
accepted. See :mod:`msight_core.aio` for the hand-offs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import RedisConfig
from ..pubsub.redis import RedisPubSub
from ._handoff import LoopFed
from ._template import AsyncQueueBackend

__all__ = ["AsyncRedisPubSub"]


class _Core(RedisPubSub, LoopFed):
    """RedisPubSub whose receive queue wakes an asyncio consumer."""

    def backlog_probe(self) -> Callable[[int], int]:
        # Handed to the writer minus written to the socket.
        return lambda handed: handed - int(self.stats().get("published", 0))


class AsyncRedisPubSub(AsyncQueueBackend):
    """Redis pub/sub for asyncio: broadcast, best-effort, very low latency.

    Args:
        client: a ``redis.Redis``/``redis.RedisCluster`` client whose hosts,
            credentials and TLS settings are reused, a
            :class:`~msight_core.config.RedisConfig`, or ``None`` for the
            ``MSIGHT_REDIS_MESSAGE_BROKER_*`` environment.
        config: queue and publish bounds (defaults from the environment).

    Raises:
        TypeError: ``client`` is neither a redis-py client nor a ``RedisConfig``.
        ConfigError: a setting is invalid.

    No connection is made until the first ``subscribe()`` or ``publish()``.
    """

    def __init__(self, client: Any = None, config: RedisConfig | None = None) -> None:
        core = _Core(client, config)
        super().__init__(core, core.config.publish)
