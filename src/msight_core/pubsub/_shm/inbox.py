"""Waiting for samples, and the two ways a backend instance consumes them.

:class:`Inbox` waits on the listeners of all of an instance's subscribers at
once (an iceoryx2 ``WaitSet``, plus a pipe that ``wake()`` writes to, so
``close()`` ends a wait at once) and takes samples round robin across topics.

* :class:`Reader` (the default, for ``listen()``/``receive()``): copies every
  sample out as it arrives and gives the sample straight back. While the
  application waits for a message, its own thread does this and hands the copy
  out; otherwise a reader thread copies into the backend's receive queue, so
  bursts are absorbed by the queue (``MSIGHT_QUEUE_*``), as on the other
  backends.
* :class:`Puller` (once the application asks for views): no thread; the
  consuming thread takes samples itself and hands out views that hold them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Any

from ...errors import BackpressureError
from .._core import Delivery, ReceiveQueue
from .._turns import Turns
from . import frames
from .subscriber import Decoder, Subscriber
from .views import Lease, Ledger, ShmView, exporter

__all__ = ["Inbox", "Puller", "Reader"]

logger = logging.getLogger("msight_core.pubsub.shm")

_WAIT_SLICE = 0.25  # seconds per wait: a closed flag or a signal is seen this soon


class Inbox:
    """The subscribers of one instance and the wait set over them.

    ``add()``, ``wake()`` and ``close()`` may be called from any thread; ``poll()``
    from one thread at a time.
    """

    def __init__(self, iox: Any) -> None:
        self._iox = iox
        self._lock = threading.Lock()
        self._subs: list[Subscriber] = []
        self._new: list[Subscriber] = []
        self._guards: list[Any] = []
        self._start = 0
        self.closed = False
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        builder = iox.WaitSetBuilder.new()
        mode = getattr(getattr(iox, "SignalHandlingMode", None), "Disabled", None)
        if mode is not None:
            builder = builder.signal_handling_mode(mode)
        self._waitset = builder.create(iox.ServiceType.Ipc)
        self._pipe = iox.FileDescriptor.non_owning_new(self._read_fd)
        self._pipe_guard = self._waitset.attach_notification_fd(self._pipe)
        self._guards.append(self._pipe_guard)

    def add(self, sub: Subscriber) -> None:
        """Include ``sub`` from the next ``poll()`` on (its samples wait in its port)."""
        with self._lock:
            self._new.append(sub)
        self.wake()

    def wake(self) -> None:
        """End a ``poll()`` that waits. Thread-safe."""
        try:
            os.write(self._write_fd, b"\0")
        except (BlockingIOError, OSError):  # full pipe: a wake-up is pending anyway
            pass

    def _attach_new(self) -> None:
        with self._lock:
            new, self._new = self._new, []
        for sub in new:
            self._guards.append(self._waitset.attach_notification(sub.listener))
            self._subs.append(sub)

    def _drain(self, limit: int) -> list[tuple[Subscriber, Any]]:
        out: list[tuple[Subscriber, Any]] = []
        subs = self._subs
        count = len(subs)
        if not count:
            return out
        start = self._start = (self._start + 1) % count
        for i in range(count):
            sub = subs[(start + i) % count]
            while len(out) < limit:
                sample = sub.take()
                if sample is None:
                    break
                out.append((sub, sample))
        return out

    def poll(self, timeout: float | None, limit: int) -> list[tuple[Subscriber, Any]]:
        """Up to ``limit`` samples, waiting up to ``timeout`` seconds (``None``: no limit).

        ``[]`` after the timeout, once closed, or when :meth:`wake` was called:
        the caller checks its own state and polls again.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        iox = self._iox
        while True:
            self._attach_new()
            out = self._drain(limit) if limit > 0 else []
            if out or self.closed:
                return out
            wait = _WAIT_SLICE
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return out
            result = self._waitset.wait_and_process_with_timeout(iox.Duration.from_secs_f64(wait))
            if self._clear(result[0] if isinstance(result, tuple) else None):
                return []

    def _clear(self, fired: list[Any] | None) -> bool:
        """Consume the wake-ups; True if :meth:`wake` was among them.

        ``fired``: the attachments the wait set reported. The pipe is read only
        when it is among them (``None``: not known, read it): a read of an empty
        pipe (a system call and an exception) took about 30 µs of the ~0.5 ms
        from a loan to a view.
        """
        for sub in self._subs:
            sub.clear_events()
        if fired is not None and not any(a.has_event_from(self._pipe_guard) for a in fired):
            return False
        woken = False
        try:
            while os.read(self._read_fd, 4096):
                woken = True
        except (BlockingIOError, OSError):
            pass
        return woken

    def close(self) -> None:
        """Detach everything and release the wait set (after ``poll()`` returned)."""
        self.closed = True
        guards, self._guards = self._guards, []
        for guard in reversed(guards):
            try:
                guard.delete()
            except Exception:  # closing goes on
                logger.debug("detaching from the wait set failed", exc_info=True)
        try:
            self._waitset.delete()
        except Exception:
            logger.debug("deleting the wait set failed", exc_info=True)
        for fd in (self._read_fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


class Reader:
    """Copies samples into the receive queue as they arrive, or hands them to ``listen()``.

    A thread (``msight-shm-reader``) takes samples whenever the application is
    not waiting for one, so the few samples a subscriber's buffer holds are
    never overwritten while the application is busy. While the application
    waits in ``listen()``/``receive()`` with nothing queued, it takes the turn
    (:meth:`pull`, see :mod:`.._turns`): the sample is copied on the thread that
    hands it out, with no hand-over between threads on the way.
    """

    def __init__(self, inbox: Inbox, decoder: Decoder, queue: ReceiveQueue) -> None:
        self._inbox = inbox
        self._decoder = decoder
        self._queue = queue
        self._stopped = False
        self.turns = Turns(handoff=0.0, interrupt=inbox.wake)
        self._thread = threading.Thread(target=self._run, name="msight-shm-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        turns, queue = self.turns, self._queue
        while not self._stopped:
            if turns.stand_aside():
                continue
            with turns.lock:
                if self._stopped:
                    return
                # Samples taken are always delivered, also when stop() came meanwhile:
                # whoever consumes next (views) finds them in the queue.
                batch = self._take(None)
                if batch is None:
                    return
                if batch:
                    # One lock and C loops while they fit; the overflow policy for the rest.
                    queue.offer(batch)
                    if batch:
                        queue.put_many(batch)

    def _take(self, timeout: float | None) -> deque[Delivery] | None:
        """Samples that arrive within ``timeout`` as deliveries (empty when woken);
        ``None`` once the inbox failed (``listen()`` raises it)."""
        inbox, decoder = self._inbox, self._decoder
        try:
            items = inbox.poll(timeout, 64)
        except Exception as exc:  # listen() must not hang on a dead reader
            if not self._stopped:
                logger.exception("shm reader stopped")
                self._queue.fail(exc)
            self._stopped = True
            return None
        batch: deque[Delivery] = deque()
        decode = decoder.messages
        for sub, sample in items:
            try:
                batch.extend(decode(sub.topic, sample, sub.grouped))
            except Exception as exc:  # noqa: BLE001 - a bad sample costs only itself
                decoder.failed(sub.topic, exc)
        return batch

    def pull(self, wait: float) -> list[Delivery] | None:
        """``listen()`` is here for more (the ``_pull`` hook of :class:`.._core.QueueBackend`).

        With ``wait > 0``: take the samples that arrive within ``wait`` seconds on
        the calling thread and return them (handed out without passing through
        the queue, as far as its bounds allow; none: ``[]``); ``None`` if the
        turn was not free or the reader stopped."""
        if self._stopped:
            return None
        return self.turns.pull(self._pulled, wait)  # type: ignore[no-any-return]

    def _pulled(self, wait: float) -> list[Delivery]:
        queue = self._queue
        if self._stopped or len(queue):
            return []
        batch = self._take(wait)
        if not batch:
            return []
        taken = queue.fitting(batch) if not len(queue) else []
        if batch:  # beyond what the queue may hold: its overflow policy decides
            queue.offer(batch)
            if batch:
                queue.put_many(batch)
        return taken

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread (it finishes the samples in hand) and wait for a listener
        that holds the turn to leave the inbox. Idempotent."""
        self._stopped = True
        self._inbox.wake()
        self.turns.wake_reader()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self.turns.lock.acquire(timeout=timeout):  # nobody polls the inbox any more
            self.turns.lock.release()


class Puller:
    """Views for the consuming thread: samples are taken when it asks for them.

    Args:
        inbox: the instance's inbox (no reader thread runs any more).
        decoder: header checks and loss counts.
        ledger: the views held; at most ``ledger.limit``.
        leftovers: messages the reader copied before views were asked for;
            handed out first, as copies.
    """

    def __init__(self, inbox: Inbox, decoder: Decoder, ledger: Ledger, leftovers: list[Any]):
        self._inbox = inbox
        self._decoder = decoder
        self._ledger = ledger
        self._copies: deque[tuple[str, bytes]] = deque((d.topic, d.data) for d in leftovers)
        self.lock = threading.Lock()

    def next_view(self, timeout: float | None, transient: bool = False) -> ShmView | None:
        """The next message as a view; ``None`` after ``timeout`` or once closed.

        ``transient``: the caller releases the view before anything else (it may
        use the one borrow iceoryx2 allows beyond the limit).

        Raises:
            BackpressureError: ``ledger.limit`` sample-backed views are held.
        """
        with self.lock:
            if self._copies:
                return self._copy_view()
            held = self._ledger.held()
            if held >= self._ledger.limit and not transient:
                kept = self._ledger.still_referenced()
                why = f" ({kept} released but still referenced by arrays)" if kept else ""
                raise BackpressureError(
                    f"{held} shm views held{why}, the most MSIGHT_SHM_MAX_VIEWS="
                    f"{self._ledger.limit} allows: release one (leave its with-block or call "
                    ".release()) before receiving the next"
                )
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                items = self._inbox.poll(remaining, 1)
                if not items:
                    if self._inbox.closed or (
                        deadline is not None and time.monotonic() >= deadline
                    ):
                        return None
                    continue
                view = self._view(*items[0])
                if view is not None:
                    return view
                if self._copies:
                    return self._copy_view()

    def _copy_view(self) -> ShmView:
        topic, data = self._copies.popleft()
        return ShmView(topic, memoryview(data), None, self._ledger)

    def _view(self, sub: Subscriber, sample: Any) -> ShmView | None:
        decoder = self._decoder
        found = decoder.header(sub.topic, sample, sub.grouped)
        if found is None:
            sample.delete()
            return None
        head, address, size = found
        if head.kind != frames.SINGLE:
            try:
                for message in decoder.batch(sub.topic, head, address, size):
                    self._copies.append((sub.topic, message))
            finally:
                sample.delete()
            return None
        lease = Lease(sample, exporter(address + head.offset, head.value))
        data = memoryview(lease.exporter).cast("B").toreadonly()
        return ShmView(sub.topic, data, lease, self._ledger)

    def next_delivery(self, timeout: float | None) -> Delivery | None:
        """The next message as bytes (a copy); for ``listen()``/``receive()`` in view mode."""
        view = self.next_view(timeout, transient=True)
        if view is None:
            return None
        try:
            return Delivery(view.topic, view.data.tobytes())
        finally:
            view.release()
