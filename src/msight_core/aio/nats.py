"""``AsyncNATSPubSub``: the asyncio twin of :class:`~msight_core.pubsub.NATSPubSub`.

Core NATS or JetStream mode, queue groups, large frames: everything of the
synchronous backend, whose nats-py client runs on its own event-loop thread.
Received batches go from that loop to the caller's loop in one
``call_soon_threadsafe`` per batch; acknowledgements (JetStream) go back the
same way, in batches. See :mod:`msight_core.aio` for the hand-offs, and why
the client does not (yet) run on the caller's loop.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import NatsConfig
from ..pubsub.nats import NATSPubSub
from ._handoff import LoopFed
from ._template import AsyncQueueBackend

__all__ = ["AsyncNATSPubSub"]


class _Core(NATSPubSub, LoopFed):
    """NATSPubSub whose receive queue wakes an asyncio consumer."""

    def backlog_probe(self) -> Callable[[int], int]:
        # Messages in the publisher's buffer, not yet handed to nats-py.
        return lambda handed: int(self.stats().get("publish_buffered", 0))


class AsyncNATSPubSub(AsyncQueueBackend):
    """NATS pub/sub for asyncio: broadcast or queue groups; JetStream when configured.

    Args:
        config: a :class:`~msight_core.config.NatsConfig`
            (``get_nats_config(group_id=...)``); ``None`` reads ``MSIGHT_NATS_*``.
            With ``config.jetstream``, ``capabilities.persistent`` is true and a
            message is acknowledged when the application asks for the next one.

    Raises:
        TypeError: ``config`` is not a ``NatsConfig``.
        ConfigError: a setting is invalid.

    No connection is made until the first ``subscribe()`` or ``publish()``.
    """

    def __init__(self, config: NatsConfig | None = None) -> None:
        core = _Core(config)
        super().__init__(core, core.config.publish)
