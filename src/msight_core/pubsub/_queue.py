"""The receive queue every backend shares (not public API).

:class:`ReceiveQueue` is the bounded buffer between a backend's network reader
and the application's ``listen()``: bounded in messages and bytes, with an
explicit overflow policy, drop counts per topic, and a ``close()`` that wakes a
blocked reader at once. :class:`Delivery` is what travels through it.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable
from enum import Enum
from itertools import accumulate, repeat, starmap
from operator import itemgetter
from typing import Any, NamedTuple

from ..config import OverflowPolicy, QueueConfig

__all__ = ["CLOSED", "Delivery", "ReceiveQueue", "State", "check_payload"]

logger = logging.getLogger("msight_core.pubsub")

_DROP_LOG_INTERVAL = 5.0
_data = itemgetter(1)  # Delivery.data
_BATCH_BYTES = 1024 * 1024


class Delivery(NamedTuple):
    """A received message as a backend hands it over.

    A backend may queue a plain tuple of the same four fields instead: readers
    of the queue index deliveries (``item[1]`` is the data), never use the
    field names. (Creating a tuple subclass costs about a microsecond per
    message more than a tuple, most of it in the cyclic GC: too much for a
    drain at 200k msg/s.)
    """

    topic: str
    data: bytes
    token: Any = None
    """Backend-specific acknowledgement token (``None``: nothing to acknowledge)."""
    headers: Any = None
    """The message's trace headers, where the broker has headers and the sender set
    them (a mapping or ``(name, value)`` pairs; ``None``: none). Untrusted."""


class State(Enum):
    OPEN = "open"
    CLOSED = "closed"


_CLOSED = object()
CLOSED = _CLOSED  # what get_many() returns once the queue is closed and empty


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
                size = len(item[1])
                if self._closed:
                    return False
                while self._items and (
                    len(self._items) >= cfg.max_messages or self._bytes + size > cfg.max_bytes
                ):
                    if cfg.overflow is OverflowPolicy.DROP_OLDEST:
                        old = self._items.popleft()
                        self._bytes -= len(old[1])
                        self._drop(old[0])
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
                self._drop(item[0])  # DROP_NEWEST broke out of the loop
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
                size = len(items[0][1])
                if count and nbytes + size > cfg.max_bytes:
                    break
                queued.append(items.popleft())
                count += 1
                nbytes += size
            self._bytes = nbytes
            if queued:
                self._cond.notify()

    def fitting(self, items: deque[Delivery]) -> list[Delivery]:
        """Take from the front of ``items`` what this queue would hold if it were
        empty (at least one delivery), without queueing it: for a consumer that
        fetched them on its own thread and hands them out at once."""
        cfg = self.config
        if (
            len(items) <= cfg.max_messages
            and sum(map(len, map(_data, items))) <= cfg.max_bytes  # C speed
        ):
            taken = list(items)
            items.clear()
            return taken
        taken = []
        nbytes = 0
        while items and len(taken) < cfg.max_messages:
            size = len(items[0][1])
            if taken and nbytes + size > cfg.max_bytes:
                break
            taken.append(items.popleft())
            nbytes += size
        return taken

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
            # one at a time and the queue's byte bound keeps meaning something:
            # up to and including the delivery that reaches _BATCH_BYTES.
            items = self._items
            count = min(limit, len(items))
            batch = list(starmap(items.popleft, repeat((), count)))  # C speed
            sizes = list(accumulate(map(len, map(_data, batch))))
            if sizes[-1] >= _BATCH_BYTES:
                keep = bisect_left(sizes, _BATCH_BYTES) + 1
                if keep < count:
                    items.extendleft(reversed(batch[keep:]))
                    del batch[keep:]
            self._bytes -= sizes[len(batch) - 1]
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
