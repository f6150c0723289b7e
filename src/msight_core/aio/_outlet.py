"""The publishing hand-off: :class:`Outlet`, between the loop and a synchronous backend.

The synchronous ``publish()`` of every msight backend only queues the message
for the backend's I/O thread (Redis writer, NATS loop, librdkafka) -- except
the first time a topic is used (connect, stream or topic creation: a round
trip) and while the backend's outgoing buffer is full (it waits). So:

* **Direct**: a message to a topic already used, of at most
  :data:`DIRECT_BYTES`, goes straight to the synchronous ``publish()`` on the
  loop while nothing waits in the outlet. No thread hand-off: the same cost
  as the synchronous API. While the backend's buffer is nearly full, such a
  message waits on the loop (polling the backlog every millisecond, up to
  the publish timeout) instead of blocking it, then goes directly too.
* **Drained**: everything else (a topic's first message, large payloads, and
  every message of a backend that gives no backlog figure) is appended to the
  outlet and ``publish()`` returns; one worker thread at a time (the
  *drainer*) hands the messages, in order, to the synchronous ``publish()``,
  where any waiting happens. The loop feels it only as backpressure:
  ``publish()`` awaits room once the outlet is full.

The backlog is probed (the backend's ``stats()``) once per :data:`PROBE_BYTES`
of direct traffic; direct sending pauses while it is within a few probe
intervals of the backend's bound. Between two probes at most ``PROBE_BYTES``
are added, so a direct call never finds the buffer full. Messages are only
sent directly when the outlet is empty and the drainer idle, so order is kept.

Counters have one writer each (``accepted*`` and ``direct`` the loop, ``sent*``
the drainer), so nothing is locked per message; the drainer starts and stops
through a hand-shake with one lock at the transitions (see :meth:`Outlet._drain`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from ..errors import BackpressureError, ClosedError, MsightError, PublishError
from ..pubsub._core import check_payload
from ._handoff import resolve

__all__ = ["Outlet"]

logger = logging.getLogger("msight_core.aio")

Send = Callable[[str, bytes], None]
Probe = Callable[[int], int]

#: Largest payload sent directly from the loop (bigger ones gain nothing from it).
DIRECT_BYTES = 64 * 1024
#: Direct traffic between two probes of the backend's backlog.
PROBE_BYTES = 1024 * 1024
#: Direct sending stops above this many messages in the backend's backlog, whatever
#: their size (librdkafka also bounds its queue in messages: 1,000,000).
MAX_BACKLOG = 500_000
_BACKLOG_POLL = 0.001  # seconds between two looks at a backlog too high for direct sending
_WARM_TOPICS = 10_000


class Outlet:
    """Accepted publishes on their way to a synchronous backend.

    Args:
        send: the backend's ``publish(name, data)`` for checked arguments; called by
            one thread at a time (the drainer).
        direct: the same without the closed check, for the loop (see the module).
        max_bytes: payload bytes accepted and not yet handed over, at most.
        max_messages: messages accepted and not yet handed over, at most.
        timeout: seconds ``publish()`` waits for room before ``BackpressureError``.
        executor: runs the drainer.
        probe: the backend's backlog in messages (accepted, not yet sent), given
            the messages handed to it so far, for direct sending; ``None``: never
            send directly.
        backlog_bytes: direct sending stops while the backlog is above this.
        name_of: checks a topic (``Topic`` or ``str``) and returns its name.
        what: the backend, for error messages.
    """

    def __init__(
        self,
        send: Send,
        direct: Send,
        max_bytes: int,
        max_messages: int,
        timeout: float,
        executor: Executor,
        probe: Probe | None = None,
        backlog_bytes: int = 0,
        name_of: Callable[[Any], str] = str,
        what: str = "the backend",
    ) -> None:
        self._send = send
        self._name_of = name_of
        self._what = what
        #: Set by the backend when it starts closing: publish() raises ClosedError.
        self.closed = False
        self._send_direct = direct
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        self.timeout = timeout
        self._executor = executor
        self._items: deque[tuple[str, bytes]] = deque()
        self._lock = threading.Lock()
        self._running = False
        self.accepted = 0  # written on the loop only
        self.accepted_bytes = 0
        self.sent = 0  # written by the drainer only
        self.sent_bytes = 0
        self.lost = 0
        self._error: BaseException | None = None
        self._error_topic = ""
        # (threshold, future): resolved once ``sent`` reaches the threshold.
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._room: tuple[int, asyncio.Future[None]] | None = None  # (sent_bytes target, future)
        self._probe = probe
        self._backlog_bytes = backlog_bytes
        self._budget = 0  # direct bytes left before the next probe
        self._warm: set[str] = set()  # topics the drainer has sent to
        self.direct = 0  # messages sent directly (counted apart from accepted/sent)
        self._probed_at = 0

    # -- on the loop ------------------------------------------------------------------

    def pending(self) -> tuple[int, int]:
        """Messages and bytes accepted and not yet handed to the backend."""
        return self.accepted - self.sent, self.accepted_bytes - self.sent_bytes

    def _eligible(self, name: str, data: bytes) -> bool:
        """May this message go directly, backlog aside? (Nothing queued before it,
        a topic already used, a small payload, a backend that can be probed.)"""
        return (
            not self._running
            and not self._items
            and len(data) <= DIRECT_BYTES
            and name in self._warm
            and self._probe is not None
        )

    async def publish(self, topic: Any, data: Any) -> None:
        """The async backend's ``publish()``: the checks, then direct or queued.

        Raises:
            TypeError: the payload is not bytes-like (nothing queued).
            InvalidTopicError: the name is not portable (nothing queued).
            ClosedError: the backend is closed.
            PublishError: an earlier message could not be handed over.
            BackpressureError: no room within the timeout.
        """
        # The hot path of a publishing loop, in one expression: a checked topic
        # (only names that went out once are "warm"), bytes, small, nothing queued
        # before it, the backlog probed lately, nothing to report.
        if (
            type(topic) is str
            and topic in self._warm
            and type(data) is bytes
            and len(data) <= DIRECT_BYTES
            and self._budget > 0
            and not self._items
            and not self._running
            and self._error is None
            and not self.closed
        ):
            self._send_direct(topic, data)
            self._budget -= len(data) + 64
            self.direct += 1
            return
        name = self._name_of(topic)  # raises InvalidTopicError
        data = check_payload(data)  # raises TypeError
        if self.closed:
            raise ClosedError(f"{self._what} is closed")
        await self.put(name, data)

    async def put(self, name: str, data: bytes) -> None:
        """Accept a checked message the hot path of :meth:`publish` did not send.

        A message that may go directly waits (polling the backend's backlog, not
        blocking the loop) until the backend's buffer has room, then goes; any
        other is queued for the drainer, waiting only while the outlet is full.

        Raises:
            PublishError: an earlier message could not be handed over.
            BackpressureError: no room within the timeout.
        """
        if self._error is not None:
            self.raise_error()
        if self._eligible(name, data):
            state = self._allow_direct()
            if state is not None:  # None: no figure from the backend, use the drainer
                if not state:
                    await self._wait_for_backlog()
                if self._eligible(name, data):  # nothing got queued meanwhile
                    self._send_direct(name, data)
                    self._budget -= len(data) + 64
                    self.direct += 1
                    return
        await self._queue(name, data)

    async def _wait_for_backlog(self) -> None:
        """Until the backend's backlog allows direct sending again (polls every ms)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            await asyncio.sleep(_BACKLOG_POLL)
            if self._allow_direct() is not False:
                return
            if loop.time() >= deadline:
                raise BackpressureError(
                    f"the backend's publish buffer stayed nearly full for {self.timeout:g}s: "
                    "the broker is unreachable or slower than the publishers"
                )

    async def _queue(self, name: str, data: bytes) -> None:
        """Queue one message for the drainer; waits only while the outlet is full."""
        size = len(data)
        count = self.accepted - self.sent
        if count and (
            count >= self.max_messages
            or self.accepted_bytes - self.sent_bytes + size > self.max_bytes
        ):
            await self._wait_for_room(size)
        self._items.append((name, data))
        self.accepted += 1
        self.accepted_bytes += size
        if not self._running:
            self._start()

    def _allow_direct(self) -> bool | None:
        """Probe the backend's backlog: may the next ``PROBE_BYTES`` go directly?

        ``None``: the backend gives no figure (no probe, or it failed).
        """
        if self._probe is None:
            return None
        try:
            backlog = self._probe(self.sent + self.direct)
        except Exception:
            logger.debug("backlog probe failed", exc_info=True)
            return None
        if backlog < 0:
            return None
        # Average size of what was sent lately (directly since the last probe, else all).
        count, nbytes = self.direct - self._probed_at, PROBE_BYTES - max(self._budget, 0)
        if count <= 0:
            count, nbytes = max(self.accepted, 1), self.accepted_bytes
        self._probed_at = self.direct
        allowed = backlog <= MAX_BACKLOG and backlog * (nbytes // count + 64) <= self._backlog_bytes
        self._budget = PROBE_BYTES if allowed else 0
        return allowed

    def _start(self) -> None:
        with self._lock:
            if self._running:
                return
            self._running = True
        try:
            self._executor.submit(self._drain)
        except RuntimeError:  # the executor is shut down: the backend is closed
            self._running = False
            raise ClosedError("the backend is closed") from None

    async def _wait_for_room(self, size: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            count, nbytes = self.pending()
            if not count or (count < self.max_messages and nbytes + size <= self.max_bytes):
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BackpressureError(
                    f"publish buffer full ({count} message(s), {nbytes} bytes not yet handed "
                    f"to the broker's client) for {self.timeout:g}s"
                )
            future = loop.create_future()
            # Wake when half of what is pending now has gone.
            with self._lock:
                self._room = (self.sent_bytes + max(nbytes // 2, 1), future)
                if not self._running and self._items:
                    self._room = None
                    future.set_result(None)
            handle = loop.call_later(min(remaining, 0.5), resolve, future)
            try:
                await future
            finally:
                handle.cancel()
                with self._lock:
                    if self._room is not None and self._room[1] is future:
                        self._room = None

    async def drained(self, timeout: float) -> bool:
        """Wait until everything accepted so far was handed to the backend.

        Returns:
            ``False`` if that did not happen within ``timeout`` seconds.
        """
        target = self.accepted
        if self.sent >= target:
            return True
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self.sent >= target:
                return True
            self._waiters.append((target, future))
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            return False
        finally:
            with self._lock:
                self._waiters = [w for w in self._waiters if w[1] is not future]
        return True

    def raise_error(self) -> None:
        """Raise (once) what went wrong with an earlier message, as ``PublishError``."""
        exc, self._error = self._error, None
        if exc is None:
            return
        if isinstance(exc, PublishError):
            raise exc
        raise PublishError(
            f"an earlier message to {self._error_topic!r} was not sent ({self.lost} lost so "
            f"far): {exc}"
        ) from exc

    # -- the drainer (one worker thread at a time) ---------------------------------------

    def _drain(self) -> None:
        items = self._items
        send = self._send
        warm = self._warm
        while True:
            while items:
                name, data = items.popleft()
                try:
                    send(name, data)
                    if name not in warm and len(warm) < _WARM_TOPICS:
                        warm.add(name)
                except Exception as exc:  # noqa: BLE001 - reported by the next call on the loop
                    self._failed(name, data, exc)
                self.sent += 1
                self.sent_bytes += len(data)
                if self._waiters or self._room is not None:
                    self._release()
            # Stop, then look again: a message appended after the last look either
            # sees _running False (and starts a drainer) or is seen here.
            self._running = False
            if not items:
                break
            with self._lock:
                if self._running:
                    break  # the loop started another drainer
                self._running = True
        self._release()

    def _release(self) -> None:
        """Resolve the waiters whose condition holds (drainer thread)."""
        with self._lock:
            ready = []
            if self._waiters:
                keep = []
                for target, future in self._waiters:
                    if self.sent >= target:
                        ready.append(future)
                    else:
                        keep.append((target, future))
                self._waiters = keep
            room = self._room
            if room is not None and (self.sent_bytes >= room[0] or not self._items):
                self._room = None
                ready.append(room[1])
        for future in ready:
            try:
                future.get_loop().call_soon_threadsafe(resolve, future)
            except RuntimeError:  # that loop is closed
                pass

    def _failed(self, name: str, data: bytes, exc: Exception) -> None:
        if isinstance(exc, PublishError):
            # It reports earlier messages; this one was not taken: send it once more.
            self._record(name, exc, lost=False)
            try:
                self._send(name, data)
                return
            except Exception as again:  # noqa: BLE001 - recorded below
                exc = again
        self._record(name, exc, lost=True)

    def _record(self, name: str, exc: BaseException, lost: bool) -> None:
        if lost:
            self.lost += 1
        if self._error is None:
            self._error = exc
            self._error_topic = name
        level = logging.WARNING if isinstance(exc, MsightError) else logging.ERROR
        logger.log(level, "publish to %r failed in the background: %s", name, exc)
