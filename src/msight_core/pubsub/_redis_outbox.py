"""The bounded outgoing buffer shared by the Redis publishers (not public API).

Both the single-server and the cluster publisher accept messages into a buffer
that one writer thread drains. This class holds what they share: the bound
(``PublishConfig.buffer_bytes``, waited on for at most ``PublishConfig.timeout``),
``flush()``, a ``close()`` that is bounded even when Redis is gone, and the
counters. A subclass supplies ``_run`` (the writer), ``_interrupt`` (unblock it
when closing times out) and ``where`` (for messages).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ..errors import BackpressureError, MsightError

__all__ = ["Outbox"]

logger = logging.getLogger("msight_core.pubsub.redis")


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
        self._last_problem: str | None = None
        self._thread: threading.Thread | None = None
        self.published = 0
        self.unrouted = 0
        self.failed = 0
        self.possibly_lost = 0
        self.reconnects = 0

    # -- caller side (hold self._cond where noted) ------------------------------------

    def _admit(self, size: int) -> None:
        """With the lock held: raise a stored fatal error, or wait for room."""
        if self._fatal is not None:
            self._raise_fatal()
        if self._pending_bytes and self._pending_bytes + size > self.buffer_bytes:
            self._wait_for_room(size)

    def _accepted(self, size: int) -> None:
        """With the lock held: count one message in and make sure the writer runs."""
        self._pending_msgs += 1
        self._pending_bytes += size
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()

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
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    why = f" (last error: {self._last_problem})" if self._last_problem else ""
                    raise BackpressureError(
                        f"flush timed out with {self._pending_msgs} message(s) not yet "
                        f"delivered to {self.where}{why}"
                    )
                self._cond.notify_all()
                self._cond.wait(min(remaining, 0.1))

    def close(self, timeout: float) -> None:
        """Deliver what is buffered (up to ``timeout`` seconds), then stop the writer."""
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

    # -- what a publisher supplies ------------------------------------------------------

    def _run(self) -> None:
        raise NotImplementedError

    def _interrupt(self) -> None:
        """Unblock the writer thread's socket calls (closing timed out)."""
