"""``AsyncKafkaPubSub``: the asyncio twin of :class:`~msight_core.pubsub.KafkaPubSub`.

Durable, at-least-once, consumer groups: librdkafka's producer and the
backend's consumer thread are the synchronous backend's. A message's offset is
committed only after the application took it and asked for the next one (or
closed without an error); a cancelled ``receive()`` or ``listen()`` leaves the
rest queued and uncommitted. See :mod:`msight_core.aio` for the hand-offs.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

from ..config import KafkaConfig
from ..pubsub.kafka import KafkaPubSub
from ._handoff import LoopFed
from ._template import AsyncQueueBackend

__all__ = ["AsyncKafkaPubSub"]


class _Core(KafkaPubSub, LoopFed):
    """KafkaPubSub whose receive queue wakes an asyncio consumer."""

    def backlog_probe(self) -> Callable[[int], int]:
        # Messages librdkafka holds (queued, in flight, being retried). KafkaPubSub
        # has no public figure for it yet: read its publisher, or report "unknown"
        # (-1: never direct) if that changes shape.
        def backlog(handed: int) -> int:
            publisher = getattr(self, "_publisher", None)
            pending = getattr(publisher, "pending", None)
            if publisher is None:
                return 0
            return int(pending()) if callable(pending) else -1

        return backlog


class AsyncKafkaPubSub(AsyncQueueBackend):
    """Kafka pub/sub for asyncio: persistent, at-least-once, consumer groups.

    Args:
        config: settings (``get_kafka_config(group_id=...)``); ``None`` reads
            ``MSIGHT_KAFKA_*`` from the environment.

    Raises:
        TypeError: ``config`` is not a ``KafkaConfig``.
        ConfigError: a librdkafka property is invalid.

    No connection is made until the first ``subscribe()`` or ``publish()``.
    """

    def __init__(self, config: KafkaConfig | None = None) -> None:
        core = self._kafka = _Core(config)
        super().__init__(core, core.config.publish)

    async def replay(self, topic: Any, start: str | float | datetime.datetime) -> int:
        """Move this instance's partitions of ``topic``; see ``KafkaPubSub.replay``.

        Waits (in a worker thread) for one broker round trip.

        Returns:
            The number of partitions moved.

        Raises:
            ConfigError: ``start`` is not one of the accepted forms.
            RuntimeError: ``topic`` is not subscribed.
            BrokerUnavailableError: the broker did not answer.
        """
        self._check_open()
        return int(await self._in_worker(self._kafka.replay, topic, start))
