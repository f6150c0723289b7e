"""Who drives a backend's consumer: the reader thread or the listener (:class:`Turns`).

Some backends read with a client that one thread may use at a time (Kafka's
consumer, the shm wait set): the holder of :attr:`Turns.lock`. The reader
thread drives it by default. While the application's thread waits in
``listen()``/``receive()`` with nothing queued, it takes the turn itself
(:meth:`Turns.pull`): what arrives is fetched, decoded and handed out on the
thread that uses it, instead of being passed from the reader thread to the
application's. On Kafka that hand-over cost a 1 KB drain about a fifth of its
rate (two threads taking turns at the GIL; every record allocated on one core
and freed on the other); on shm it cost a 16 MB frame up to a millisecond of
latency (the reader thread wakes the listener, which then waits for the GIL).

The reader thread stands aside while the listener waits for or holds the turn,
and for ``handoff`` seconds after the application last came for more. When
the application is busy elsewhere (handling a message, or not listening at
all) the reader thread drives again, so fetching ahead, commits, rebalances
and posted commands never wait for the application. A backend whose own
buffers are small (shm: a few samples) uses ``handoff=0``: the reader drives
whenever the listener is not in :meth:`Turns.pull`, and the listener calls
``interrupt`` to end a wait the reader is in while it holds the turn.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["HANDOFF", "Turns"]

#: By default the reader thread stands aside this long after the application last pulled.
HANDOFF = 0.05


class Turns:
    """The consumer's lock and the hand-over between the reader and the listener.

    Args:
        handoff: seconds the reader thread stands aside after the listener last
            came for more.
        interrupt: called (from the listener's thread) when the listener wants
            the turn while the reader holds it: it ends a wait the reader is in.
    """

    def __init__(
        self, handoff: float = HANDOFF, interrupt: Callable[[], None] | None = None
    ) -> None:
        self.lock = threading.Lock()
        self._handoff = handoff
        self._interrupt = interrupt
        self._pulled = 0.0  # monotonic time the listener last asked for a turn
        self._waiting = False  # the listener waits for the lock or holds it
        self._nudge = threading.Event()

    def stand_aside(self) -> bool:
        """Reader thread: ``True`` after waiting a while because the listener drives
        or wants to (look again), ``False`` when it is the reader's turn."""
        idle = time.monotonic() - self._pulled
        if idle >= self._handoff and not self._waiting:
            return False
        self._nudge.wait(max(0.001, self._handoff - idle) if self._handoff > 0 else HANDOFF)
        self._nudge.clear()
        return True

    def wake_reader(self) -> None:
        """Give the turn back to the reader thread now (a command was posted or the
        reader stops: the listener may be away handling a message)."""
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
        lock = self.lock
        self._waiting = True
        try:
            if not lock.acquire(blocking=False):
                if self._interrupt is not None:
                    self._interrupt()
                if not lock.acquire(timeout=wait):
                    return None
            try:
                return step(wait)
            finally:
                lock.release()
        finally:
            self._waiting = False
            if self._handoff <= 0:  # the reader waits for this, not for time to pass
                self._nudge.set()
