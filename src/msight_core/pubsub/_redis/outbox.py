"""The bounded outgoing buffer shared by the Redis publishers, and their tuning.

Both the single-server and the cluster publisher accept messages into a buffer
that one writer thread drains. :class:`Outbox` holds what they share: the bound
(``PublishConfig.buffer_bytes``, waited on for at most ``PublishConfig.timeout``),
``flush()``, a ``close()`` that is bounded even when Redis is gone, the
counters, and the flush at interpreter exit. A subclass supplies ``_run`` (the
writer), ``_interrupt`` (unblock it when closing times out) and ``where``.

The tuning constants of every Redis reader and writer live here, once.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from typing import Any

from ...errors import BackpressureError, MsightError, PermissionDeniedError, PublishError

__all__ = [
    "BACKOFF_MAX",
    "BACKOFF_MIN",
    "CLOSE_TIMEOUT",
    "CLUSTER_RETRY_MAX",
    "RECV_CHUNK",
    "REPLY_HIGH_WATER",
    "RESUBSCRIBE_GRACE",
    "Outbox",
]

logger = logging.getLogger("msight_core.pubsub.redis")

#: A writer reads the replies to what it sent once this many are outstanding
#: (and whenever its buffer runs empty), so replies never pile up on the server.
REPLY_HIGH_WATER = 8192
#: Bytes a writer asks for per ``recv`` when it reads replies.
RECV_CHUNK = 256 * 1024
#: Reconnect back-off: starts here and doubles per failed attempt ...
BACKOFF_MIN = 0.05
#: ... up to this with one server (nothing else to try) ...
BACKOFF_MAX = 1.0
#: ... or this in a cluster, where a replica takes over within the cluster's
#: node timeout and the new owner should be found quickly.
CLUSTER_RETRY_MAX = 0.25
#: After a publisher reconnects, how long a channel that had subscribers before
#: the outage waits for one of them to subscribe again before its buffered
#: messages are sent to whoever is there: longer than a subscriber's longest
#: reconnect back-off plus its connection set-up.
RESUBSCRIBE_GRACE = 3.0
#: How long ``close()`` waits for a reader thread to stop.
CLOSE_TIMEOUT = 5.0

_live: weakref.WeakSet[Outbox] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    # A script that publishes and exits must not lose what publish() accepted.
    for outbox in list(_live):
        try:
            outbox.close(CLOSE_TIMEOUT)
        except Exception:  # pragma: no cover - best effort at interpreter exit
            logger.debug("flush at exit failed", exc_info=True)


class Outbox:
    """Accepted-but-undelivered messages and the thread that delivers them."""

    #: Human-readable destination, e.g. ``"Redis at host:port"``.
    where = "Redis"
    thread_name = "msight-redis-writer"

    def __init__(self, buffer_bytes: int, timeout: float) -> None:
        self.buffer_bytes = buffer_bytes
        self.timeout = timeout
        self._cond = threading.Condition(threading.Lock())
        self._pending: list[Any] = []
        self._pending_msgs = 0  # accepted, not yet written (includes the batch in hand)
        self._pending_bytes = 0
        self._unreplied = 0  # written, reply not read yet
        self._closing = False
        self._abort = False
        self._fatal: MsightError | None = None
        self._refusal: PublishError | None = None  # raised once by publish()/flush()
        self._last_problem: str | None = None
        self._thread: threading.Thread | None = None
        self.published = 0
        self.unrouted = 0
        self.failed = 0
        self.possibly_lost = 0
        self.reconnects = 0
        _live.add(self)

    # -- caller side (hold self._cond where noted) ------------------------------------

    def _admit(self, size: int) -> None:
        """With the lock held: raise a stored fatal error, or wait for room."""
        if self._fatal is not None:
            self._raise_fatal()
        if self._refusal is not None:
            self._raise_refusal()
        if self._pending_bytes and self._pending_bytes + size > self.buffer_bytes:
            self._wait_for_room(size)

    def _accepted(self, size: int) -> None:
        """With the lock held: count one message in and make sure the writer runs."""
        self._pending_msgs += 1
        self._pending_bytes += size
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()

    def _publish_refused(self, name: str, reply: bytes) -> None:
        """An error reply to a PUBLISH: count it, log it, report it to the caller.

        The next ``publish()`` or ``flush()`` raises :class:`PublishError` (once),
        with :class:`PermissionDeniedError` as its cause when an ACL refused it.
        """
        text = reply[1:201].decode("utf-8", "replace")
        with self._cond:
            self.failed += 1
            if self._refusal is None:
                error = PublishError(f"{self.where} refused a PUBLISH to {name}: {text}")
                if text.startswith("NOPERM"):
                    error.__cause__ = PermissionDeniedError(text)
                self._refusal = error
                self._cond.notify_all()
        logger.error("%s refused a PUBLISH to %s: %s", self.where, name, text)

    def _raise_refusal(self) -> None:
        error, self._refusal = self._refusal, None
        assert error is not None
        raise error

    def _raise_fatal(self) -> None:
        assert self._fatal is not None
        raise type(self._fatal)(str(self._fatal))

    def _wait_for_room(self, size: int) -> None:
        deadline = time.monotonic() + self.timeout
        while self._pending_bytes and self._pending_bytes + size > self.buffer_bytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closing:
                why = f"; last error: {self._last_problem}" if self._last_problem else ""
                raise BackpressureError(
                    f"{self.where}: publish buffer full ({self._pending_bytes} bytes pending, "
                    f"bound {self.buffer_bytes}) for {self.timeout:g}s{why}"
                )
            self._cond.wait(remaining)
            if self._fatal is not None:
                self._raise_fatal()

    def flush(self, timeout: float | None) -> None:
        """Wait until every accepted message was written and answered.

        Raises:
            BackpressureError: not done within ``timeout`` (default: publish timeout).
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._cond:
            while self._pending_msgs or self._unreplied:
                if self._fatal is not None:
                    self._raise_fatal()
                if self._refusal is not None:
                    self._raise_refusal()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    why = f" (last error: {self._last_problem})" if self._last_problem else ""
                    raise BackpressureError(
                        f"flush timed out with {self._pending_msgs} message(s) not yet "
                        f"delivered to {self.where}{why}"
                    )
                self._cond.notify_all()
                self._cond.wait(min(remaining, 0.1))
            if self._refusal is not None:
                self._raise_refusal()

    def close(self, timeout: float) -> None:
        """Deliver what is buffered (up to ``timeout`` seconds), then stop the writer."""
        _live.discard(self)
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                self._abort = True
                self._interrupt()
                with self._cond:
                    self._cond.notify_all()
                thread.join(1.0)
        with self._cond:
            if self._pending_msgs:
                logger.warning(
                    "closing with %d message(s) undelivered: %s unreachable",
                    self._pending_msgs,
                    self.where,
                )

    def stats(self) -> dict[str, Any]:
        """Counters for ``RedisPubSub.stats()``."""
        return {
            "published": self.published,
            "unrouted": self.unrouted,
            "possibly_lost": self.possibly_lost,
            "publisher_reconnects": self.reconnects,
        }

    # -- what a publisher supplies ------------------------------------------------------

    def _run(self) -> None:
        raise NotImplementedError

    def _interrupt(self) -> None:
        """Unblock the writer thread's socket calls (closing timed out)."""
