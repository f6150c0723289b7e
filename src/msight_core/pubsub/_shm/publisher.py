"""``Publisher``: one topic of one backend instance, and the loans it lends.

Messages up to :data:`SMALL_BYTES` are packed together: ``publish()`` appends
them to a pending batch, sent as one sample when it reaches
:data:`BATCH_BYTES`, or shortly after by the :class:`Flusher` thread (whatever
has gathered by the time it runs). A small message that follows a pause of
more than a millisecond is sent at once: at a sensor's pace nothing waits. Larger messages are copied into a sample and
sent in the caller's thread, after the pending batch, so one publisher's
messages keep their order. Every message goes to the broadcast service when
someone subscribes to it, and to one member of each group (:mod:`.groups`).

Publishing never waits for a subscriber: a subscriber that falls behind loses
its oldest samples (iceoryx2's safe overflow), and counts them.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from ...config import ShmConfig
from ...errors import ClosedError, PublishError
from . import frames
from .destination import SLACK, Destination
from .groups import GroupRouter
from .services import Runtime, base_name
from .views import exporter

__all__ = ["BATCH_BYTES", "SMALL_BYTES", "Flusher", "Loan", "Publisher"]

logger = logging.getLogger("msight_core.pubsub.shm")

#: Messages up to this size travel batched.
SMALL_BYTES = 64 * 1024
#: A pending batch is sent by ``publish()`` itself once it holds this many bytes:
#: big enough that a subscriber's few buffered samples hold thousands of small
#: messages (a reader thread kept from the GIL for 5 ms loses none).
BATCH_BYTES = 1024 * 1024
_BATCH_COUNT = 8192
#: A message published this long after the previous one is sent at once, unbatched.
_IDLE = 0.001
#: Seconds ``close()`` keeps the ports after a sample reached a subscriber, so the
#: subscriber can still map them and take it.
CLOSE_LINGER = 0.25
_monotonic = time.monotonic
_RECORD = frames.RECORD.size  # bytes of a message's entry in a batch's length table
_warned_loan_refs = False


class Publisher:
    """Publishes ``topic``: broadcast plus one member per group. Thread-safe.

    Args:
        runtime: the instance's iceoryx2 node.
        topic: validated topic name.
        config: shm settings.
        on_pending: called (outside the lock) when a batch starts pending.

    Raises:
        ConfigError: ``/dev/shm`` too small for this topic's publisher, or the
            topic's services exist with other settings.
    """

    def __init__(
        self,
        runtime: Runtime,
        topic: str,
        config: ShmConfig,
        on_pending: Callable[[Publisher], None],
    ) -> None:
        self.topic = topic
        base = base_name(config.domain, topic)
        self.broadcast = Destination(runtime, base, config.max_subscribers, config)
        try:
            self.router = GroupRouter(runtime, base, config)
        except BaseException:
            self.broadcast.close()
            raise
        self._on_pending = on_pending
        # A batch never needs a larger sample than the biggest frame (the memory bound).
        self._small = min(SMALL_BYTES, config.max_frame_bytes // 2)
        self._batch = min(BATCH_BYTES, config.max_frame_bytes)
        self._lock = threading.Lock()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._last_small = 0.0
        self._error: BaseException | None = None
        self.closed = False
        self.published = 0
        self.unrouted = 0

    # -- publishing -------------------------------------------------------------------

    def publish(self, data: Any, length: int) -> None:
        """Send (or batch) one message of ``length`` bytes. Never waits for subscribers.

        Raises:
            ClosedError: the publisher was closed.
            PublishError: an earlier batch sent in the background failed.
            PayloadTooLargeError, BackpressureError, BrokerUnavailableError: from
                the shared-memory layer.
        """
        if length > self._small:
            with self._lock:
                if self.closed or self._error is not None:
                    self._check()
                self.published += 1
                self._flush_locked()
                self._send_frame(lambda dest: dest.send_single(data, length))
            return
        if type(data) is not bytes:
            data = bytes(data)  # the caller may reuse a mutable buffer
        with self._lock:
            if self.closed or self._error is not None:
                self._check()
            self.published += 1
            size = self._pending_bytes + length + _RECORD
            if size > self._batch:
                self._flush_locked()
                size = length + _RECORD
            pending = self._pending
            wake = not pending
            pending.append(data)
            self._pending_bytes = size
            now = _monotonic()
            if (
                size >= self._batch
                or len(pending) >= _BATCH_COUNT
                # Nothing sent for a while: no batch to wait for, send it now
                # (the flusher thread may not get the GIL for milliseconds).
                or (wake and now - self._last_small > _IDLE)
            ):
                self._flush_locked()
                wake = False
            self._last_small = now
        if wake:
            self._on_pending(self)

    def _check(self) -> None:
        if self.closed:
            raise ClosedError(f"shm publisher of {self.topic!r} is closed")
        error, self._error = self._error, None
        if error is not None:
            raise PublishError(
                f"earlier messages to {self.topic!r} were not delivered: {error}"
            ) from error

    def _flush_locked(self) -> None:
        messages = self._pending
        if not messages:
            return
        self._pending = []
        self._pending_bytes = 0
        router = self.router
        router.refresh()
        reached = 0
        if self.broadcast.subscribers():  # nobody listening: skip the copy
            reached = self.broadcast.send_batch(messages)
        if router.active:
            router.send_batches(messages)
        elif not reached:
            self.unrouted += len(messages)

    def _send_frame(self, send: Callable[[Destination], int]) -> None:
        router = self.router
        router.refresh()
        reached = send(self.broadcast) if self.broadcast.subscribers() else 0
        if router.active:
            router.send_each(send)
        elif not reached:
            self.unrouted += 1

    def flush(self) -> None:
        """Send the pending batch now. Blocks only for the copy.

        Raises:
            PublishError: a batch sent in the background failed.
        """
        with self._lock:
            if self.closed:
                return
            self._check()
            self._flush_locked()

    def flush_quietly(self) -> None:
        """The flusher's :meth:`flush`: a failure is kept for the next call to raise."""
        try:
            with self._lock:
                if not self.closed:
                    self._flush_locked()
        except Exception as exc:  # noqa: BLE001 - raised by the next publish()/flush()
            logger.warning("shm batch to %r failed: %s", self.topic, exc)
            self._error = exc

    # -- loans ------------------------------------------------------------------------

    def loan(self, nbytes: int) -> Loan:
        """Lend a sample of ``nbytes`` to write one message in place.

        Raises:
            ClosedError, PayloadTooLargeError, BackpressureError: as :meth:`publish`.
        """
        with self._lock:
            self._check()
            sample = self.broadcast.take(nbytes + SLACK)
        return Loan(self, sample, nbytes)

    def send_loan(self, sample: Any, offset: int, length: int) -> None:
        """Send a loaned sample (after the pending batch); copies go to group members."""
        with self._lock:
            if self.closed:
                sample.delete()
                raise ClosedError(f"shm publisher of {self.topic!r} is closed")
            self.published += 1
            self._flush_locked()
            router = self.router
            router.refresh()
            if router.active:
                address = sample.payload_ptr + offset
                router.send_each(lambda dest: dest.send_from(address, length))
            broadcast = self.broadcast
            reached = broadcast.finish(sample, broadcast.single_header(offset, length))
            if not reached and not router.active:
                self.unrouted += 1

    def discard_loan(self, sample: Any) -> None:
        # No lock: iceoryx2 ports are thread-safe, and this runs from __del__ too.
        sample.delete()

    # -- lifecycle --------------------------------------------------------------------

    def housekeeping_due(self) -> bool:
        return self.router.active

    def stats(self) -> dict[str, int]:
        dests = [self.broadcast, *self.router.destinations()]
        return {
            "published": self.published,
            "samples": sum(d.samples for d in dests),
            "unrouted": self.unrouted + self.router.lost,
            "group_members": len(dests) - 1,
        }

    def close(self) -> None:
        """Send what is pending, then delete the ports. Idempotent."""
        with self._lock:
            if self.closed:
                return
            try:
                self._flush_locked()
            except Exception as exc:  # noqa: BLE001 - closing goes on
                logger.warning("shm: %d message(s) to %r lost on close: %s",
                               len(self._pending), self.topic, exc)  # fmt: skip
            self.closed = True
            # A subscriber maps a publisher's segment when it next receives; if the
            # port is gone by then, what it was sent is lost (iceoryx2 issue #39).
            # So a publisher that just reached someone lingers a moment.
            dests = [self.broadcast, *self.router.destinations()]
            since = _monotonic() - max(d.last_reached for d in dests)
            if since < CLOSE_LINGER:
                time.sleep(CLOSE_LINGER - since)
            self.router.close()
            self.broadcast.close()


class Loan:
    """A sample lent for one message: write into :attr:`buffer`, then it is sent.

    As a context manager: ``with backend.loan(topic, n) as buf`` hands out the
    writable ``memoryview``; the message is sent when the block ends normally
    and dropped when it raises. Not thread-safe; one loan is written by one thread.
    """

    def __init__(self, publisher: Publisher, sample: Any, nbytes: int) -> None:
        self._publisher = publisher
        self._sample: Any = sample
        self.nbytes = nbytes
        ptr = sample.payload_ptr
        self._offset = frames.single_offset(ptr)
        self._exporter: Any = exporter(ptr + self._offset, nbytes)
        self._buffer: memoryview | None = memoryview(self._exporter).cast("B")

    @property
    def buffer(self) -> memoryview:
        """The writable payload, ``nbytes`` long (uninitialized memory).

        Raises:
            ValueError: the loan was sent or discarded.
        """
        if self._buffer is None:
            raise ValueError("this shm loan was sent or discarded")
        return self._buffer

    @property
    def done(self) -> bool:
        return self._sample is None

    def _end(self) -> Any:
        sample, self._sample = self._sample, None
        buffer, self._buffer = self._buffer, None
        if buffer is not None:
            try:
                buffer.release()
            except BufferError:
                pass
        if sample is not None and sys.getrefcount(self._exporter) > 2:
            _warn_loan_refs()
        self._exporter = None
        return sample

    def send(self) -> None:
        """Send the message (once). Raises ``ValueError`` if already sent or discarded."""
        sample = self._end()
        if sample is None:
            raise ValueError("this shm loan was already sent or discarded")
        self._publisher.send_loan(sample, self._offset, self.nbytes)

    def discard(self) -> None:
        """Give the sample back unsent. Idempotent."""
        sample = self._end()
        if sample is not None:
            self._publisher.discard_loan(sample)

    def __enter__(self) -> memoryview:
        return self.buffer

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None and not self.done:
            self.send()
        else:
            self.discard()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # never raise from a finalizer
            self.discard()


def _warn_loan_refs() -> None:
    global _warned_loan_refs
    if not _warned_loan_refs:
        _warned_loan_refs = True
        logger.warning(
            "a memoryview or array made from an shm loan buffer outlived the loan: "
            "writing through it changes a frame subscribers may be reading"
        )


class Flusher:
    """Sends pending batches on its own thread, and runs housekeeping every few seconds.

    Args:
        housekeeping: called about every ``interval`` seconds on the thread.
    """

    def __init__(self, housekeeping: Callable[[], None], interval: float = 2.0) -> None:
        self._housekeeping = housekeeping
        self._interval = interval
        self._lock = threading.Lock()
        self._due: list[Publisher] = []
        self._event = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="msight-shm-flusher", daemon=True)
        self._thread.start()

    def request(self, publisher: Publisher) -> None:
        """Flush ``publisher`` soon. Thread-safe, cheap."""
        with self._lock:
            if publisher not in self._due:
                self._due.append(publisher)
        self._event.set()

    def _run(self) -> None:
        next_round = time.monotonic() + self._interval
        while True:
            self._event.wait(max(0.0, next_round - time.monotonic()))
            self._event.clear()
            with self._lock:
                due, self._due = self._due, []
            for publisher in due:
                publisher.flush_quietly()
            if self._stopped:
                return
            if time.monotonic() >= next_round:
                next_round = time.monotonic() + self._interval
                try:
                    self._housekeeping()
                except Exception:  # housekeeping is retried next round
                    logger.debug("shm housekeeping failed", exc_info=True)

    def stop(self, timeout: float = 5.0) -> None:
        """Flush what is due, then end the thread. Idempotent."""
        self._stopped = True
        self._event.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
