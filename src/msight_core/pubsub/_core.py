"""Machinery shared by the msight backends (not public API).

The bounded receive queue (:class:`ReceiveQueue`, :class:`Delivery`) lives in
:mod:`._queue` and is re-exported here.

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
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

from ..config import QueueConfig
from ..errors import ClosedError, InvalidTopicError
from ..topics import is_topic_pattern, topic_name, validate_topic_pattern
from ._queue import CLOSED as _CLOSED
from ._queue import Delivery, ReceiveQueue, State, check_payload
from .base import Message, PubSubBackend

__all__ = ["Delivery", "QueueBackend", "ReceiveQueue", "State", "check_payload"]

logger = logging.getLogger("msight_core.pubsub")

# Fetching on the listening thread (``_pull``): the longest wait per turn.
_PULL_WAIT = 0.1


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
        # Taken with receive(ack=False) and not yet acknowledged, in order.
        self._unacked: list[Delivery] = []
        self.delivered = 0
        # Set by a backend whose reader may run on the listening thread: called
        # each time listen() takes a batch, and with a wait (seconds) when
        # nothing is queued: then it fetches here and returns what it fetched
        # (handed out without passing through the queue; may be empty), or
        # None if it could not.
        self._pull: Callable[[float], list[Delivery] | None] | None = None

    # -- the seed contract --------------------------------------------------------

    def subscribe(self, topic: Any) -> None:
        name, pattern = self._subscription(topic)
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
        local = self._local
        while True:
            item = self._next(None)
            if item is None:
                return
            yield item[1]  # data
            # The rest of the batch taken with it, inline while nothing in it needs
            # acknowledging or checking (what _next does for such deliveries).
            while local and local[0][2] is None and self._state is State.OPEN:
                item = self._in_hand = local.popleft()
                self.delivered += 1
                yield item[1]

    def receive(self, timeout: float | None = None, *, ack: bool = True) -> Message | None:
        """Take the next message with its topic; ``None`` after ``timeout`` seconds.

        The alternative to ``listen()`` for loops that must wake up regularly.
        As with ``listen()``, a message is acknowledged (on backends with
        acknowledgements: Kafka groups, NATS JetStream) when the next one is
        taken or the backend is closed.

        Args:
            timeout: seconds to wait at most; ``None`` waits until a message
                arrives or the backend is closed.
            ack: ``False`` leaves this message unacknowledged until
                :meth:`acknowledge` is called: for code that must not let the
                broker forget a message before it has been handled elsewhere
                (the bridge acknowledges only what its destination confirmed).
                Messages taken so and not acknowledged when the backend is
                closed are delivered again (to this group) by the broker.

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
        if not ack and item[2] is not None:  # token
            self._in_hand = None
            self._unacked.append(item)
        return Message(item[0], item[1])  # topic, data

    def acknowledge(self) -> int:
        """Acknowledge every message taken with ``receive(ack=False)`` so far, in order.

        Call it from the thread that receives. Does nothing on backends without
        acknowledgements (their ``receive(ack=False)`` keeps nothing back).

        Returns:
            The number of messages acknowledged.
        """
        held, self._unacked = self._unacked, []
        for item in held:
            self._ack(item)
        if held:
            self._ack_flush()
        return len(held)

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

    def received_headers(self) -> Any:
        """Trace headers of the message ``listen()``/``receive()`` handed out last
        (``None``: none, or the broker has no headers); see :mod:`msight_core.tracing`."""
        in_hand = self._in_hand
        return None if in_hand is None else in_hand[3]  # headers

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

    def _subscription(self, topic: Any) -> tuple[str, bool]:
        """The checked name of ``topic`` and whether it is a wildcard pattern.

        Raises:
            InvalidTopicError: not a portable name, or a pattern this backend
                cannot subscribe.
        """
        raw = topic if type(topic) is str else getattr(topic, "name", topic)
        if type(raw) is str and is_topic_pattern(raw):
            name = validate_topic_pattern(raw)
            if not self.capabilities.patterns:
                raise InvalidTopicError(
                    f"{type(self).__name__} does not support wildcard subscriptions ({name!r})"
                )
            return name, True
        return self._name(topic), False

    def _check_open(self) -> None:
        if self._state is not State.OPEN:
            raise ClosedError(f"{type(self).__name__} is closed")

    def _check_listen(self) -> None:
        self._check_open()
        if not self._topics:
            raise RuntimeError("listen() called before subscribe(): subscribe to a topic first")

    def _next(self, timeout: float | None) -> Delivery | None:
        previous, self._in_hand = self._in_hand, None
        if previous is not None and previous[2] is not None:  # token
            self._ack(previous)
        local = self._local
        while True:
            if not local:
                self._ack_flush()  # about to wait: nothing held back meanwhile
                if self._pull is None:
                    batch = self._queue.get_many(timeout, self._batch_limit)
                else:
                    batch = self._pulled(timeout)
                if batch is _CLOSED or not batch:
                    return None
                local.extend(batch)
            elif self._state is not State.OPEN:
                return None
            item = local.popleft()
            if not self._filtering or item[2] is None or self._accept(item):
                break
        self._in_hand = item
        self.delivered += 1
        return item

    def _pulled(self, timeout: float | None, limit: int = 0) -> Any:
        """``get_many()``, fetching on this thread while nothing is queued (``_pull``)."""
        get_many, pull = self._queue.get_many, self._pull
        limit = limit or self._batch_limit
        assert pull is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            batch = get_many(0, limit)
            if batch:  # messages, or the queue is closed
                pull(0)  # still here: the reader thread keeps standing aside
                return batch
            wait = _PULL_WAIT if deadline is None else min(_PULL_WAIT, deadline - time.monotonic())
            if wait <= 0:
                return batch
            fetched = pull(wait)
            if fetched:  # fetched here: straight to listen(), no queue in between
                return fetched if self._state is State.OPEN else _CLOSED  # close() meanwhile
            if fetched is not None:  # fetched nothing, or the queue filled meanwhile
                continue
            # Not our turn (the reader thread is busy, or stopping): wait on the queue.
            wait = _PULL_WAIT if deadline is None else min(_PULL_WAIT, deadline - time.monotonic())
            if wait > 0:
                batch = get_many(wait, limit)
                if batch:
                    pull(0)
                    return batch

    def _shutdown(self, commit_in_hand: bool) -> None:
        with self._state_lock:
            if self._state is State.CLOSED:
                return
            self._state = State.CLOSED
        self._queue.close()
        self._local.clear()
        self._unacked = []  # never confirmed: the broker delivers them again
        in_hand, self._in_hand = self._in_hand, None
        try:
            if commit_in_hand and in_hand is not None and in_hand[2] is not None:
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
