"""``AsyncNATSPubSub``: the asyncio twin of :class:`~msight_core.pubsub.NATSPubSub`.

Core NATS or JetStream mode, queue groups, large frames, the checks of what the
server sends: everything of the synchronous backend, whose roles it reuses
(:class:`~msight_core.pubsub.nats.NATSLoopClient`), with nats-py running on the
caller's own event loop: no thread. The parser hands received batches to the
receive queue on that loop, and a consumer waiting in ``listen()`` or
``receive()`` is woken with a plain ``call_soon``; ``publish()`` appends to the
publisher's buffer, which the writer coroutine sends on the same loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..config import NatsConfig, load_nats_config
from ..errors import ClosedError
from ..pubsub._core import Delivery, check_payload
from ..pubsub.nats import NATSLoopClient
from ._handoff import LoopFed
from ._template import AsyncQueueBase

__all__ = ["AsyncNATSPubSub"]

#: Bytes ``publish()`` queues before it lets the loop run once (the writer, others).
YIELD_BYTES = 256 * 1024


class _Queue(LoopFed):
    """The receive queue and its bookkeeping (topics, acknowledgements), fed on the
    loop by a :class:`NATSLoopClient`, which does everything else."""

    def __init__(self, config: NatsConfig) -> None:
        super().__init__(config.queue)
        queue = self._queue
        self.client = NATSLoopClient(config, queue.put_many, queue.offer, queue.fail)
        self.capabilities = self.client.capabilities

    def __repr__(self) -> str:
        return repr(self.client)

    # The synchronous entry points of QueueBackend would block the loop they run on:
    # AsyncNATSPubSub subscribes and publishes through the client instead.
    def _subscribe(self, name: str) -> None:
        raise RuntimeError("AsyncNATSPubSub subscribes on its loop: await subscribe()")

    def _publish(self, name: str, data: bytes) -> None:
        raise RuntimeError("AsyncNATSPubSub publishes on its loop: await publish()")

    def _close(self) -> None:
        """Nothing blocking here: AsyncNATSPubSub closes the client after this."""

    def _ack(self, delivery: Delivery) -> None:
        self.client.ack(delivery.token)

    def _ack_flush(self) -> None:
        self.client.ack_flush()

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out.update(self.client.stats())
        return out


class AsyncNATSPubSub(AsyncQueueBase):
    """NATS pub/sub for asyncio: broadcast or queue groups; JetStream when configured.

    nats-py runs on the loop of the first awaited call (no thread); use the
    instance from that loop only.

    Args:
        config: a :class:`~msight_core.config.NatsConfig`
            (``get_nats_config(group_id=...)``); ``None`` reads ``MSIGHT_NATS_*``.
            With ``config.jetstream``, ``capabilities.persistent`` is true and a
            message is acknowledged when the application asks for the next one.

    Raises:
        TypeError: ``config`` is not a ``NatsConfig``.
        ConfigError: a setting is invalid.

    No connection is made until the first ``subscribe()`` or ``publish()``; the
    first ``publish()`` to a topic waits for the connection (and, in JetStream
    mode, the topic's stream), as the synchronous one does; after that
    ``publish()`` waits only while the outgoing buffer is full. A ``publish()``
    cancelled while it waits has queued nothing; one that returned is sent.
    """

    # The reader runs on this loop: a wake-up is a call_soon, never worth polling.
    polls = False

    def __init__(self, config: NatsConfig | None = None) -> None:
        if config is None:
            config = load_nats_config()
        if not isinstance(config, NatsConfig):
            raise TypeError(
                "AsyncNATSPubSub expects a NatsConfig (get_nats_config()), got "
                f"{type(config).__name__}"
            )
        queue = self._feed = _Queue(config)
        super().__init__(queue)
        self.config = config
        self.group_id = config.group_id
        self._client = queue.client
        self._subscribing: asyncio.Lock | None = None
        self._unyielded = 0  # bytes published since publish() last gave way to the loop
        self._names: set[str] = set()  # topic names checked by publish()

    @property
    def connection_state(self) -> str:
        """``"connected"``, ``"disconnected for 2.5s"``, ``"not connected"`` ..."""
        return self._client.connection_state

    async def subscribe(self, topic: Any) -> None:
        queue = self._feed
        name, pattern = queue.subscription(topic)  # InvalidTopicError at once
        self._check_open()
        if self._subscribing is None:
            self._subscribing = asyncio.Lock()
        async with self._subscribing:  # one at a time: a topic is subscribed once
            self._check_open()
            if name in queue.topics:
                return
            await self._client.subscribe(name, pattern)
            queue.subscribed(name)

    async def publish(self, topic: Any, serialized_data: bytes) -> None:
        if type(topic) is str and topic in self._names and type(serialized_data) is bytes:
            name, data = topic, serialized_data  # a name checked before, bytes
        else:
            name = self._feed.name_of(topic)  # InvalidTopicError
            data = check_payload(serialized_data)  # TypeError
            if len(self._names) < 10_000:
                self._names.add(name)
        if self._unyielded >= YIELD_BYTES:
            # A publishing loop that never suspends would keep the writer (a task of
            # this same loop) and every other task from running: give way every
            # YIELD_BYTES, before queueing (a cancellation here queues nothing).
            self._unyielded = 0
            await asyncio.sleep(0)
        if self._closing:
            raise ClosedError("AsyncNATSPubSub is closed")
        if self._client.publish_nowait(name, data):
            self._unyielded += len(data) + 64
        else:
            await self._client.publish(name, data)

    async def flush(self, timeout: float | None = None) -> None:
        if not self._closing:
            await self._client.flush(timeout)

    async def _release(self, commit_in_hand: bool) -> None:
        self._feed.close_with(commit_in_hand)  # queue closed, the message in hand acked
        await self._client.close()
