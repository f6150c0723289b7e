"""Machinery shared by the msight backends (not public API).

:class:`ReceiveQueue` is the bounded buffer between a backend's network reader
and the application's ``listen()``: bounded in messages and bytes, with an
explicit overflow policy, drop counts per topic, and a ``close()`` that wakes a
blocked reader at once.

:class:`QueueBackend` implements the seed contract on top of it: input rules
(topic names, payload types), subscription bookkeeping, ``listen()`` /
``receive()``, acknowledgement of a message when the application comes back for
the next one, and idempotent ``close()``. A concrete backend only moves bytes:
``_subscribe``, ``_publish``, ``_flush``, ``_close`` and optionally ``_ack``,
``_ack_flush`` and ``_accept`` (skip queued deliveries that went stale).
"""

from __future__ import annotations

import logging
import threading
import time
from abc import abstractmethod
from collections import deque
from collections.abc import Iterable, Iterator
from enum import Enum
from operator import itemgetter
from types import TracebackType
from typing import Any, NamedTuple

from ..config import OverflowPolicy, QueueConfig
from ..errors import ClosedError, InvalidTopicError
from ..topics import is_topic_pattern, topic_name, validate_topic_pattern
from .base import Message, PubSubBackend

__all__ = ["Delivery", "QueueBackend", "ReceiveQueue", "State", "check_payload"]

logger = logging.getLogger("msight_core.pubsub")

_DROP_LOG_INTERVAL = 5.0
_data = itemgetter(1)  # Delivery.data
_BATCH_BYTES = 1024 * 1024


class Delivery(NamedTuple):
    """A received message as a backend hands it over."""

    topic: str
    data: bytes
    token: Any = None
    """Backend-specific acknowledgement token (``None``: nothing to acknowledge)."""


class State(Enum):
    OPEN = "open"
    CLOSED = "closed"


_CLOSED = object()


def check_payload(data: Any) -> bytes:
    """Return the payload as ``bytes``; copy mutable buffers; refuse everything else.

    Raises:
        TypeError: ``data`` is not ``bytes``, ``bytearray`` or ``memoryview``.
    """
    if type(data) is bytes:
        return data
    if isinstance(data, (bytes, bytearray, memoryview)):
        # Copy: the caller may reuse the buffer while we still hold the message.
        return bytes(data)
    raise TypeError(
        "serialized_data must be bytes, bytearray or memoryview, got "
        f"{type(data).__name__} (serialize it first, e.g. data.serialize() or text.encode())"
    )


class ReceiveQueue:
    """Bounded FIFO between a network reader thread and ``listen()``."""

    def __init__(self, config: QueueConfig) -> None:
        self.config = config
        self._items: deque[Delivery] = deque()
        self._bytes = 0
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._error: BaseException | None = None
        self.dropped: dict[str, int] = {}
        self._last_drop_log: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    # -- producer side (the backend's reader) -------------------------------------

    def put(self, item: Delivery) -> bool:
        """Queue one message; return ``False`` if it (or an older one) was dropped."""
        return self.put_many((item,))

    def put_many(self, items: Iterable[Delivery]) -> bool:
        """Queue messages in order under one lock acquisition.

        Returns ``False`` if anything was dropped by the overflow policy.
        """
        cfg = self.config
        clean = True
        with self._cond:
            for item in items:
                size = len(item.data)
                if self._closed:
                    return False
                while self._items and (
                    len(self._items) >= cfg.max_messages or self._bytes + size > cfg.max_bytes
                ):
                    if cfg.overflow is OverflowPolicy.DROP_OLDEST:
                        old = self._items.popleft()
                        self._bytes -= len(old.data)
                        self._drop(old.topic)
                        clean = False
                    elif cfg.overflow is OverflowPolicy.DROP_NEWEST:
                        break
                    else:  # BLOCK: wait for the application to take some
                        self._cond.notify_all()
                        self._cond.wait(0.5)
                        if self._closed:
                            return False
                else:  # the loop ended without break: there is room
                    self._items.append(item)
                    self._bytes += size
                    continue
                self._drop(item.topic)  # DROP_NEWEST broke out of the loop
                clean = False
            if self._items:
                self._cond.notify()
        return clean

    def offer(self, items: deque[Delivery]) -> None:
        """Move deliveries from the front of ``items`` while they fit; never waits or drops.

        For readers that apply backpressure at the source (Kafka pauses its
        partitions): what does not fit stays in ``items`` for a later call. A
        delivery bigger than ``max_bytes`` fits an empty queue. Once the queue is
        closed, ``items`` is emptied.
        """
        cfg = self.config
        with self._cond:
            if self._closed:
                items.clear()
                return
            queued = self._items
            count, nbytes = len(queued), self._bytes
            if count + len(items) <= cfg.max_messages:
                total = sum(map(len, map(_data, items)))  # C speed: per batch, per message
                if nbytes + total <= cfg.max_bytes or not count and len(items) == 1:
                    queued.extend(items)
                    items.clear()
                    count, nbytes = len(queued), nbytes + total
            while items and count < cfg.max_messages:
                size = len(items[0].data)
                if count and nbytes + size > cfg.max_bytes:
                    break
                queued.append(items.popleft())
                count += 1
                nbytes += size
            self._bytes = nbytes
            if queued:
                self._cond.notify()

    def fail(self, exc: BaseException) -> None:
        """Make ``get()`` raise ``exc`` once the queued messages are consumed."""
        with self._cond:
            self._error = exc
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._items.clear()
            self._bytes = 0
            self._cond.notify_all()

    def _drop(self, topic: str) -> None:
        # Called with the lock held.
        self.dropped[topic] = self.dropped.get(topic, 0) + 1
        self._unlogged[topic] = self._unlogged.get(topic, 0) + 1
        now = time.monotonic()
        if now - self._last_drop_log.get(topic, 0.0) >= _DROP_LOG_INTERVAL:
            logger.warning(
                "receive queue full on topic %r: dropped %d message(s) (%s; total %d); "
                "the application reads slower than messages arrive",
                topic,
                self._unlogged[topic],
                self.config.overflow.value,
                self.dropped[topic],
            )
            self._unlogged[topic] = 0
            self._last_drop_log[topic] = now

    # -- consumer side (listen) ---------------------------------------------------

    def get_many(self, timeout: float | None = None, limit: int = 256) -> Any:
        """Up to ``limit`` deliveries in order; ``[]`` on timeout; ``_CLOSED`` when closed.

        Taking a batch per lock acquisition keeps the consumer's cost per message
        low enough to follow 100k msg/s.
        """
        with self._cond:
            if not self._items:
                deadline = None if timeout is None else time.monotonic() + timeout
                while not self._items:
                    if self._closed:
                        return _CLOSED
                    if self._error is not None:
                        exc, self._error = self._error, None
                        raise exc
                    if deadline is None:
                        self._cond.wait()
                    else:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            return []
                        self._cond.wait(remaining)
            if self._closed:
                return _CLOSED
            # Batches stay small in bytes too, so big frames are still handed out
            # one at a time and the queue's byte bound keeps meaning something.
            items = self._items
            batch = [items.popleft()]
            size = len(batch[0].data)
            while items and len(batch) < limit and size < _BATCH_BYTES:
                item = items.popleft()
                size += len(item.data)
                batch.append(item)
            self._bytes -= size
            if self.config.overflow is OverflowPolicy.BLOCK:
                self._cond.notify_all()
            return batch

    def get(self, timeout: float | None = None) -> Any:
        """Next delivery, ``None`` on timeout, or the ``_CLOSED`` sentinel."""
        batch = self.get_many(timeout, 1)
        if batch is _CLOSED:
            return _CLOSED
        return batch[0] if batch else None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes


class QueueBackend(PubSubBackend):
    """The seed contract over a :class:`ReceiveQueue`; subclasses move bytes."""

    def __init__(self, queue_config: QueueConfig) -> None:
        self._queue = ReceiveQueue(queue_config)
        self._topics: dict[str, None] = {}
        self._valid_names: set[str] = set()
        self._state = State.OPEN
        self._state_lock = threading.RLock()
        self._in_hand: Delivery | None = None
        # Deliveries taken from the queue in one batch, handed out one by one.
        self._local: deque[Delivery] = deque()
        self._batch_limit = 256
        # Only a backend that overrides _accept pays for asking it (per message).
        self._filtering = type(self)._accept is not QueueBackend._accept
        self.delivered = 0

    # -- the seed contract --------------------------------------------------------

    def subscribe(self, topic: Any) -> None:
        raw = topic if type(topic) is str else getattr(topic, "name", topic)
        pattern = type(raw) is str and is_topic_pattern(raw)
        if pattern:
            name = validate_topic_pattern(raw)
            if not self.capabilities.patterns:
                raise InvalidTopicError(
                    f"{type(self).__name__} does not support wildcard subscriptions ({name!r})"
                )
        else:
            name = self._name(topic)
        with self._state_lock:
            self._check_open()
            if name in self._topics:
                return
            if pattern:
                self._subscribe_pattern(name)
            else:
                self._subscribe(name)
            self._topics[name] = None

    def publish(self, topic: Any, serialized_data: bytes) -> None:
        name = self._name(topic)
        data = check_payload(serialized_data)
        if self._state is not State.OPEN:
            raise ClosedError(f"{type(self).__name__} is closed")
        self._publish(name, data)

    def listen(self) -> Iterator[bytes]:
        self._check_listen()
        return self._listen()

    def _listen(self) -> Iterator[bytes]:
        while True:
            item = self._next(None)
            if item is None:
                return
            yield item.data

    def receive(self, timeout: float | None = None) -> Message | None:
        """Take the next message with its topic; ``None`` after ``timeout`` seconds.

        The alternative to ``listen()`` for loops that must wake up regularly.

        Raises:
            RuntimeError: nothing was subscribed.
            ClosedError: the backend is closed.
        """
        self._check_listen()
        item = self._next(timeout)
        if item is None:
            if self._state is not State.OPEN:
                raise ClosedError(f"{type(self).__name__} is closed")
            return None
        return Message(item.topic, item.data)

    def flush(self, timeout: float | None = None) -> None:
        if self._state is State.OPEN:
            self._flush(timeout)

    def close(self) -> None:
        self._shutdown(commit_in_hand=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A message whose processing raised is not acknowledged.
        self._shutdown(commit_in_hand=exc_type is None)

    @property
    def closed(self) -> bool:
        return self._state is State.CLOSED

    @property
    def topics(self) -> tuple[str, ...]:
        """Names subscribed on this instance, in subscription order."""
        return tuple(self._topics)

    def stats(self) -> dict[str, Any]:
        """Counters for the application: delivered, queued, dropped per topic."""
        return {
            "delivered": self.delivered,
            "queued": len(self._queue) + len(self._local),
            "queued_bytes": self._queue.nbytes,
            "dropped": dict(self._queue.dropped),
        }

    # -- helpers ------------------------------------------------------------------

    def _name(self, topic: Any) -> str:
        name = topic if type(topic) is str else getattr(topic, "name", None)
        if type(name) is str and name in self._valid_names:
            return name
        name = topic_name(topic)  # raises InvalidTopicError
        if len(self._valid_names) < 10_000:
            self._valid_names.add(name)
        return name

    def _check_open(self) -> None:
        if self._state is not State.OPEN:
            raise ClosedError(f"{type(self).__name__} is closed")

    def _check_listen(self) -> None:
        self._check_open()
        if not self._topics:
            raise RuntimeError("listen() called before subscribe(): subscribe to a topic first")

    def _next(self, timeout: float | None) -> Delivery | None:
        previous, self._in_hand = self._in_hand, None
        if previous is not None and previous.token is not None:
            self._ack(previous)
        local = self._local
        while True:
            if not local:
                self._ack_flush()  # about to wait: nothing held back meanwhile
                batch = self._queue.get_many(timeout, self._batch_limit)
                if batch is _CLOSED or not batch:
                    return None
                local.extend(batch)
            elif self._state is not State.OPEN:
                return None
            item = local.popleft()
            if not self._filtering or item.token is None or self._accept(item):
                break
        self._in_hand = item
        self.delivered += 1
        return item

    def _shutdown(self, commit_in_hand: bool) -> None:
        with self._state_lock:
            if self._state is State.CLOSED:
                return
            self._state = State.CLOSED
        self._queue.close()
        self._local.clear()
        in_hand, self._in_hand = self._in_hand, None
        try:
            if commit_in_hand and in_hand is not None and in_hand.token is not None:
                try:
                    self._ack(in_hand)
                except Exception:  # closing must go on; the message is redelivered
                    logger.warning("could not acknowledge the last message on close", exc_info=True)
        finally:
            self._close()

    # -- what a backend implements ------------------------------------------------

    def _subscribe_pattern(self, pattern: str) -> None:
        """Subscribe to every topic ``pattern`` matches (backends with ``patterns``).

        Deliveries carry the topic each message was published to.
        """
        raise InvalidTopicError(f"{type(self).__name__} does not support wildcard subscriptions")

    @abstractmethod
    def _subscribe(self, name: str) -> None:
        """Subscribe on the broker; return once the subscription is active."""

    @abstractmethod
    def _publish(self, name: str, data: bytes) -> None:
        """Queue ``data`` for ``name``; thread-safe, no round trip per call."""

    def _flush(self, timeout: float | None) -> None:
        """Wait until accepted publishes reached the broker."""

    def _ack(self, delivery: Delivery) -> None:
        """Acknowledge a processed delivery (backends with acknowledgements)."""

    def _ack_flush(self) -> None:
        """Send acknowledgements ``_ack`` held back (called before waiting for more)."""

    def _accept(self, delivery: Delivery) -> bool:
        """False if ``delivery`` went stale while queued: it is then skipped.

        Asked on the ``listen()`` thread for each delivery that carries a token,
        just before it is handed out. A skipped delivery is neither handed out,
        counted nor acknowledged: the broker delivers it again (to whoever owns
        it now). Kafka skips messages of partitions revoked or rewound since.
        """
        return True

    @abstractmethod
    def _close(self) -> None:
        """Flush (bounded), stop threads and release connections. Called once."""
