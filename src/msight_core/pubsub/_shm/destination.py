"""One service a publisher writes into: its iceoryx2 publisher port and notifier.

A :class:`Destination` is the topic's broadcast service or one group member's
service. It writes samples (see :mod:`.frames`), sends them and wakes the
subscribers' listeners. Its data segment starts small and grows by powers of
two when a larger frame comes (the first 16 MB frame after 1 KB ones works);
each time it grows, ``prefault_frames`` samples of the new size are written
once, so the page faults of a fresh segment are paid then and not by the
following frames. Not thread-safe: its publisher serializes calls.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from typing import Any

import numpy as np

from ...config import ShmConfig
from ...errors import BackpressureError, BrokerUnavailableError, PayloadTooLargeError
from . import frames, internals, memcopy
from .services import Runtime

__all__ = ["INITIAL_BYTES", "SLACK", "Destination"]

logger = logging.getLogger("msight_core.pubsub.shm")

#: Initial slice length of a data segment: room for a full batch of small messages.
INITIAL_BYTES = 1024 * 1024 + 128 * 1024
#: Bytes a single message needs beyond its payload (header and alignment).
SLACK = frames.HEADER_SIZE + frames.ALIGN

_memmove = ctypes.memmove
_memset = ctypes.memset
_pack = frames.pack


class Destination:
    """A publisher port on service ``name`` (sized for ``subscribers`` ports) and its notifier.

    Raises:
        ConfigError: ``/dev/shm`` cannot hold what this port may need, or the
            service exists with other settings, or it has no room for a publisher.
        BrokerUnavailableError: iceoryx2 refused otherwise.
    """

    def __init__(self, runtime: Runtime, name: str, subscribers: int, config: ShmConfig) -> None:
        iox = runtime.iox
        self.name = name
        self.config = config
        runtime.check_space(config.segment_bound(subscribers), f"publishing on {name!r}")
        self.service = runtime.pubsub(name, subscribers)
        events = runtime.event(name, subscribers, config.max_publishers)
        builder = (
            self.service.publisher_builder()
            .initial_max_slice_len(min(INITIAL_BYTES, config.max_frame_bytes + SLACK))
            .allocation_strategy(iox.AllocationStrategy.PowerOfTwo)
            .max_loaned_samples(config.prefault_frames + 2)
        )
        self.port = runtime.create_port(
            builder.create, f"shm publisher on {name!r}", "MSIGHT_SHM_MAX_PUBLISHERS"
        )
        try:
            self.notifier = runtime.create_port(
                events.notifier_builder().create,
                f"shm notifier on {name!r}",
                "MSIGHT_SHM_MAX_PUBLISHERS",
            )
        except BaseException:
            self.port.delete()
            raise
        self._loan = internals.loaner(iox, self.port)
        self._init = internals.assume_init(iox)
        self._loan_error = iox.LoanError
        self.source = int.from_bytes(os.urandom(8), "little")
        self.index = 0  # messages sent so far: the next sample's ``first``
        self.capacity = min(INITIAL_BYTES, config.max_frame_bytes + SLACK)
        self.closed = False
        self.samples = 0
        self.last_reached = 0.0  # monotonic time of the last sample that reached a subscriber

    def subscribers(self) -> int:
        """Subscriber ports connected now (a dead process counts until cleaned up)."""
        try:
            return int(self.service.dynamic_config.number_of_subscribers)
        except Exception:  # noqa: BLE001 - treat as reachable; send() reports 0 if not
            return 1

    # -- writing ----------------------------------------------------------------------

    def take(self, total: int) -> Any:
        """Loan a sample of ``total`` bytes; grow (and pre-fault) the segment if needed.

        Raises:
            PayloadTooLargeError: iceoryx2 cannot grow the segment that far.
            BackpressureError: every loanable sample is out (loans held elsewhere).
        """
        try:
            sample = self._loan(total)
        except self._loan_error as exc:
            reason = internals.error_reason(exc)
            if "ExceedsMaxLoans" in reason:
                raise BackpressureError(
                    f"too many shm loans outstanding on {self.name!r}: send or discard one first"
                ) from exc
            raise PayloadTooLargeError(
                f"iceoryx2 cannot provide {total} bytes on {self.name!r}: {reason}"
            ) from exc
        except Exception as exc:  # e.g. AllocationGrowError
            raise BrokerUnavailableError(
                f"shm loan of {total} bytes on {self.name!r} failed: {internals.error_reason(exc)}"
            ) from exc
        if total > self.capacity:
            # The segment grew for this size: touch the samples that will be used next.
            self.capacity = 1 << total.bit_length()
            self._prefault(total)
        return sample

    def _prefault(self, total: int) -> None:
        extra = []
        try:
            for _ in range(self.config.prefault_frames):
                extra.append(self._loan(total))
        except Exception:  # fewer loans than hoped: touch what we have
            logger.debug("pre-fault stopped after %d loans", len(extra), exc_info=True)
        for sample in extra:
            _memset(sample.payload_ptr, 0, total)
        for sample in extra:
            sample.delete()

    def finish(self, sample: Any, header: bytes) -> int:
        """Write ``header``, send ``sample`` and wake the listeners; subscribers reached."""
        _memmove(sample.payload_ptr, header, frames.HEADER_SIZE)
        reached = int(self._init(sample).send())
        self.samples += 1
        if reached:
            self.last_reached = time.monotonic()
            try:
                self.notifier.notify()
            except Exception:  # subscribers also poll on their own
                logger.debug("shm notify failed on %r", self.name, exc_info=True)
        return reached

    def single_header(self, offset: int, length: int) -> bytes:
        """Header of a single message at ``offset``; advances the message index."""
        header = _pack(frames.SINGLE, offset, self.source, self.index, length)
        self.index += 1
        return header

    def send_single(self, data: Any, length: int) -> int:
        """Copy one message into a sample and send it; subscribers reached."""
        sample = self.take(length + SLACK)
        ptr = sample.payload_ptr
        offset = frames.single_offset(ptr)
        try:
            if type(data) is bytes:
                memcopy.copy_from_bytes(ptr + offset, data, length)
            else:
                copy_buffer(ptr + offset, data, length)
        except BaseException:
            sample.delete()
            raise
        return self.finish(sample, self.single_header(offset, length))

    def send_from(self, address: int, length: int) -> int:
        """Like :meth:`send_single`, copying from memory at ``address``."""
        sample = self.take(length + SLACK)
        ptr = sample.payload_ptr
        offset = frames.single_offset(ptr)
        memcopy.copy(ptr + offset, address, length)
        return self.finish(sample, self.single_header(offset, length))

    def send_batch(self, messages: list[bytes]) -> int:
        """Send small messages as one sample (length table, then the messages)."""
        table = frames.length_table(messages)
        joined = b"".join(messages)
        size = len(table) + len(joined)
        sample = self.take(frames.HEADER_SIZE + size)
        ptr = sample.payload_ptr + frames.HEADER_SIZE
        _memmove(ptr, table, len(table))
        _memmove(ptr + len(table), joined, len(joined))
        header = _pack(frames.BATCH, frames.HEADER_SIZE, self.source, self.index, len(messages))
        self.index += len(messages)
        return self.finish(sample, header)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for port in (self.notifier, self.port):
            try:
                port.delete()
            except Exception:  # closing goes on
                logger.debug("deleting an shm port failed", exc_info=True)
        # iceoryx2 removes a service once nothing references it any more.
        self.notifier = self.port = self.service = None


def copy_buffer(address: int, data: Any, length: int) -> None:
    """Copy a bytes-like object (``bytearray``, ``memoryview``, ...) to ``address``."""
    view = memoryview(data)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    # numpy gives the address of any contiguous buffer, read-only ones included.
    source = np.frombuffer(view.cast("B") if view.format != "B" else view, np.uint8)
    memcopy.copy(address, source.ctypes.data, length)
