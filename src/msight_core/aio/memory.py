"""``AsyncMemoryPubSub``: the asyncio twin of :class:`~msight_core.pubsub.MemoryPubSub`.

In-process, no broker, for tests. Asynchronous and synchronous instances on
one :class:`~msight_core.pubsub.memory.MemoryBroker` (by default the
process-wide one) see each other's messages.
"""

from __future__ import annotations

from ..config import PublishConfig, QueueConfig
from ..pubsub.memory import MemoryBroker, MemoryPubSub
from ._handoff import LoopFed
from ._template import AsyncQueueBackend

__all__ = ["AsyncMemoryPubSub"]


class _Core(MemoryPubSub, LoopFed):
    """MemoryPubSub whose receive queue wakes an asyncio consumer."""


class AsyncMemoryPubSub(AsyncQueueBackend):
    """In-memory pub/sub for asyncio (``MSIGHT_PUBSUB_BACKEND=memory``).

    Args:
        group_id: subscribers with the same ``group_id`` share the messages.
        broker: the :class:`~msight_core.pubsub.memory.MemoryBroker` to use
            (default: the process-wide one).
        queue: receive-queue bounds (default: from the environment).
    """

    def __init__(
        self,
        group_id: str | None = None,
        broker: MemoryBroker | None = None,
        queue: QueueConfig | None = None,
    ) -> None:
        core = _Core(group_id=group_id, broker=broker, queue=queue)
        self.group_id = group_id
        super().__init__(core, PublishConfig())
