"""The receiving hand-off between a backend's reader thread and an asyncio consumer.

A backend's reader (the Redis socket thread, the Kafka consumer thread, or the
NATS client on the consumer's own loop) fills the same bounded :class:`~msight_core.pubsub._core.ReceiveQueue`
as for the synchronous API: the same bounds, overflow policy, drop counts and,
on Kafka, the same pause-when-full backpressure. Two things change:

* :class:`LoopQueue` wakes a waiting asyncio consumer: after a batch is queued
  it resolves the consumer's future with ``loop.call_soon_threadsafe``. That is
  one loop wake-up per batch, and only while the consumer waits: a busy
  consumer takes batches without any hand-off at all.
* :class:`LoopFed` gives the backend a non-blocking :meth:`LoopFed.take_nowait`
  to use on the loop in place of the blocking ``_next``.

Why this design is cancellation-safe: messages stay in the thread-safe queue
until the consumer *takes* one, and taking is synchronous, on the loop, in the
same step that hands it to the application (no ``await`` in between). The only
``await`` is on the wake-up future, before anything is taken: cancelling the
task there leaves every message queued for the next ``receive()``/``listen()``,
and nothing is acknowledged that the application did not get. (A worker thread
pulling from the queue would need a second buffer and could hold a message
while its task is cancelled; a pull on the loop cannot.)
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from ..config import OverflowPolicy, QueueConfig
from ..errors import ClosedError
from ..pubsub._core import Delivery, QueueBackend, ReceiveQueue, State

__all__ = ["CLOSED", "LoopFed", "LoopQueue", "resolve"]

#: Returned by :meth:`LoopFed.take_nowait` once the backend is closed.
CLOSED: Any = object()


def resolve(future: asyncio.Future[None]) -> None:
    """Resolve ``future`` unless done (a loop callback)."""
    if not future.done():
        future.set_result(None)


class LoopQueue(ReceiveQueue):
    """A receive queue whose producers wake one asyncio consumer.

    ``waiter`` is set on the loop by the consumer before it awaits; a producer
    (any thread) clears and resolves it after queueing. The producer queues
    *before* it looks at ``waiter`` and the consumer arms ``waiter`` *before*
    it looks at the queue once more, so a wake-up is never lost.
    """

    def __init__(self, config: QueueConfig) -> None:
        super().__init__(config)
        self.waiter: asyncio.Future[None] | None = None
        self._blocking = config.overflow is OverflowPolicy.BLOCK

    def put_many(self, items: Iterable[Delivery]) -> bool:
        if not self._blocking:
            clean = super().put_many(items)
            self.wake()
            return clean
        # BLOCK waits inside put_many for room. Queue one at a time so the consumer
        # is woken for what is queued before a producer waits for it to make room.
        clean = True
        for item in items:
            clean = super().put_many((item,)) and clean
            self.wake()
        return clean

    def offer(self, items: deque[Delivery]) -> None:
        super().offer(items)
        self.wake()

    def fail(self, exc: BaseException) -> None:
        super().fail(exc)
        self.wake()

    def close(self) -> None:
        super().close()
        self.wake()

    def wake(self) -> None:
        """Resolve the consumer's future, if it waits. Any thread."""
        future = self.waiter
        if future is None:
            return
        self.waiter = None
        loop = future.get_loop()
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # a reader thread
            running = None
        if running is loop:
            # A producer on the consumer's own loop (the NATS client runs there):
            # no write to the loop's self-pipe.
            loop.call_soon(resolve, future)
            return
        try:
            loop.call_soon_threadsafe(resolve, future)
        except RuntimeError:  # the consumer's loop is closed: nobody to wake
            pass


class LoopFed(QueueBackend):
    """Mixin for a synchronous facade: the receive queue feeds an asyncio consumer.

    Listed after the facade (``class Core(RedisPubSub, LoopFed)``), its
    ``__init__`` runs inside the facade's ``super().__init__()`` call, so the
    :class:`LoopQueue` is in place before the facade hands its queue to the
    reader. Everything else of the facade (subscribing, publishing, stats,
    acknowledgements, close) is unchanged.

    The consuming methods below run on the consumer's loop and never block.
    """

    _queue: LoopQueue

    def __init__(self, queue_config: QueueConfig) -> None:
        super().__init__(queue_config)
        self._queue = LoopQueue(queue_config)

    def backlog_probe(self) -> Callable[[int], int] | None:
        """A cheap count of messages ``publish()`` accepted and not yet sent.

        The function gets how many messages were handed to this backend so far.
        With it, the async twin publishes small messages straight from the loop
        while the backlog is low (see ``_outlet``). ``None`` (the default): always
        through the drainer thread.
        """
        return None

    def sender(self) -> Callable[[str, bytes], None]:
        """This backend's own send of a checked name and ``bytes`` payload, without
        the checks of ``publish()``; for the loop, which made them (and checks
        ``closed`` itself). Thread-safe as ``publish()`` is."""
        return self._publish

    def subscription(self, topic: Any) -> tuple[str, bool]:
        """The checked name of ``topic`` and whether it is a pattern, as ``subscribe()``
        checks them (for a backend that subscribes on the loop itself).

        Raises:
            InvalidTopicError: not a portable name, or a pattern it cannot take.
        """
        return self._subscription(topic)

    def subscribed(self, name: str) -> None:
        """Record ``name`` as subscribed (after the loop subscribed it)."""
        self._topics[name] = None

    def check_listen(self) -> None:
        """Raise as ``listen()`` does: ``ClosedError``, or ``RuntimeError`` before subscribe."""
        self._check_listen()

    def release(self) -> None:
        """The application came back for the next message: acknowledge the one in hand."""
        previous, self._in_hand = self._in_hand, None
        if previous is not None and previous[2] is not None:  # token
            self._ack(previous)

    def next_nowait(self) -> Delivery | None:
        """:meth:`release`, then :meth:`take_nowait`, in one call (the hot path)."""
        previous, self._in_hand = self._in_hand, None
        if previous is not None and previous[2] is not None:  # token
            self._ack(previous)
        local = self._local
        if local and not self._filtering and self._state is State.OPEN:
            item = self._in_hand = local.popleft()
            self.delivered += 1
            return item
        return self.take_nowait()

    def take_nowait(self) -> Delivery | None:
        """The next delivery (now in hand), ``None`` if none is queued, or :data:`CLOSED`.

        Raises:
            MsightError: what the reader reported with ``fail()`` (after the
                messages queued before it).
        """
        local = self._local
        while True:
            if not local:
                batch = self._queue.get_many(0, self._batch_limit)
                if type(batch) is not list:  # the queue's closed sentinel
                    return CLOSED
                if not batch:
                    return None
                local.extend(batch)
            elif self._state is not State.OPEN:
                return CLOSED
            item = local.popleft()
            if not self._filtering or item[2] is None or self._accept(item):
                break
        self._in_hand = item
        self.delivered += 1
        return item

    def settle(self) -> None:
        """About to wait: send the acknowledgements held back so far."""
        self._ack_flush()

    def arm(self, future: asyncio.Future[None]) -> None:
        """Have the next queued batch (or close) resolve ``future``."""
        self._queue.waiter = future

    def disarm(self, future: asyncio.Future[None]) -> None:
        if self._queue.waiter is future:
            self._queue.waiter = None

    def close_with(self, commit_in_hand: bool) -> None:
        """Close; acknowledge the message in hand only if ``commit_in_hand``. Blocks."""
        self._shutdown(commit_in_hand=commit_in_hand)

    def send_checked(self, name: str, data: bytes) -> None:
        """``publish()`` of a name and ``bytes`` payload already checked (by ``name_of``).

        Raises:
            ClosedError: the backend is closed.
            MsightError: what the backend's publish raises.
        """
        if self._state is not State.OPEN:
            raise ClosedError(f"{type(self).__name__} is closed")
        self._publish(name, data)

    def name_of(self, topic: Any) -> str:
        """The checked topic name (cached, as for ``publish()``).

        Raises:
            InvalidTopicError: the name is not portable across brokers.
        """
        return self._name(topic)
