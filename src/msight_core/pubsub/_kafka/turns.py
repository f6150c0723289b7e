"""Who drives the Kafka consumer: :class:`Turns`.

librdkafka's consumer is used by one thread at a time: the holder of
:attr:`Turns.lock`. The reader thread drives it by default. While the
application's thread waits in ``listen()``/``receive()`` with nothing queued,
it takes the turn itself (:meth:`Turns.pull`): the batch is fetched,
reassembled, ordered and queued on the thread that then hands it out, instead
of being passed from the reader thread to the application's. That hand-over
cost a 1 KB drain about a fifth of its rate (two threads taking turns at the
GIL; every record allocated on one core and freed on the other).

The reader thread stands aside while the application came back for more within
:data:`HANDOFF` seconds. When the application is busy elsewhere (handling a
message, or not listening at all) the reader thread drives again, so fetching
ahead, commits, rebalances and posted commands never wait for the application.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["HANDOFF", "Turns"]

#: The reader thread stands aside this long after the application last pulled.
HANDOFF = 0.05


class Turns:
    """The consumer's lock and the hand-over between the reader and the listener."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._pulled = 0.0  # monotonic time the listener last asked for a turn
        self._waiting = False  # the listener waits for the lock
        self._nudge = threading.Event()

    def stand_aside(self) -> bool:
        """Reader thread: ``True`` after waiting a while because the listener drives
        or wants to (look again), ``False`` when it is the reader's turn."""
        idle = time.monotonic() - self._pulled
        if idle >= HANDOFF and not self._waiting:
            return False
        self._nudge.wait(max(0.001, HANDOFF - idle))
        self._nudge.clear()
        return True

    def wake_reader(self) -> None:
        """Give the turn back to the reader thread now (a command was posted: the
        listener may be away handling a message)."""
        self._pulled = 0.0
        self._nudge.set()

    def pull(self, step: Callable[[float], Any], wait: float) -> Any:
        """Listener: here for more; with ``wait > 0``, ``step(wait)`` on this thread
        once the reader thread has finished its current step (it then stands aside).

        Returns what ``step`` returned, or ``None`` if the consumer was not free
        within ``wait`` seconds.
        """
        self._pulled = time.monotonic()
        if wait <= 0:
            return None
        self._waiting = True
        try:
            taken = self.lock.acquire(timeout=wait)
        finally:
            self._waiting = False
        if not taken:
            return None
        try:
            return step(wait)
        finally:
            self.lock.release()
