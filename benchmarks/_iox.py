"""Raw iceoryx2 for ``bench_shm.py``: the client msight's shm backend is built on.

What an application would write with iceoryx2's Python API alone, sized like
the backend's defaults (4 buffered samples per subscriber, safe overflow, no
history), one pub/sub service and one event service per topic:

* ``iox``       the publisher loans a sample, copies the frame in (one
  ``memmove`` on one core), sends and notifies; the subscriber waits on a
  ``WaitSet``, takes the sample and copies it into ``bytes``
  (``ctypes.string_at``): the raw counterpart of ``shm`` (bytes in, bytes out)
* ``iox-loan``  the publisher writes only the header into the loaned sample;
  the subscriber reads the header in place: the raw counterpart of
  ``shm-loan`` (the hand-over itself)

No group routing, batching of small messages, header checks or loss counts:
the difference to msight's rows is what those, and the backend's Python,
cost.
"""

from __future__ import annotations

import ctypes
import struct
import time
from array import array
from typing import Any

__all__ = ["RawPublisher", "receive"]

_DEPTH = 4  # samples buffered per subscriber (msight's default buffer_depth)
_SUBSCRIBERS = 8


def _iox(domain: str) -> tuple[Any, Any]:
    """iceoryx2 and a node whose files are named ``<domain>_*`` (cleaned up by the bench)."""
    import iceoryx2 as iox

    iox.set_log_level_from_env_or(iox.LogLevel.Error)
    config = iox.config.default()
    config.global_cfg.prefix = iox.FileName.new(f"{domain}_")
    node = iox.NodeBuilder.new().config(config).create(iox.ServiceType.Ipc)
    return iox, node


def _services(iox: Any, node: Any, topic: str) -> tuple[Any, Any]:
    name = iox.ServiceName.new("raw/" + topic)
    pubsub = (
        node.service_builder(name)
        .publish_subscribe(iox.Slice[ctypes.c_uint8])
        .max_subscribers(_SUBSCRIBERS)
        .subscriber_max_buffer_size(_DEPTH)
        .enable_safe_overflow(True)
        .history_size(0)
        .open_or_create()
    )
    events = node.service_builder(name).event().max_listeners(_SUBSCRIBERS).open_or_create()
    return pubsub, events


class RawPublisher:
    """The publishing side of ``iox`` / ``iox-loan`` for one case."""

    def __init__(self, domain: str, topic: str, size: int) -> None:
        self.iox, self.node = _iox(domain)
        pubsub, events = _services(self.iox, self.node, topic)
        self.port = (
            pubsub.publisher_builder()
            .initial_max_slice_len(size)
            .max_loaned_samples(_DEPTH)
            .create()
        )
        self.notifier = events.notifier_builder().create()
        self.size = size
        # Pre-fault the samples the publisher will cycle through, as msight's reserve() does.
        samples = [self.port.loan_slice_uninit(size) for _ in range(_DEPTH)]
        for sample in samples:
            ctypes.memset(sample.payload_ptr, 0, size)
        for sample in samples:
            sample.delete()

    def send(self, data: bytes, stamp: Any) -> int:
        """Loan a frame-sized sample, write ``data`` (the whole frame, or for
        ``iox-loan`` only its header) at its start, send, notify; the start time."""
        t = stamp()
        sample = self.port.loan_slice_uninit(self.size)
        ctypes.memmove(sample.payload_ptr, data, len(data))
        sample.assume_init().send()
        self.notifier.notify()
        return t

    def close(self) -> None:
        time.sleep(0.25)  # let subscribers map the segment of what was just sent
        for item in (self.notifier, self.port):
            item.delete()


def receive(case: dict[str, Any], head: struct.Struct, kinds: tuple[int, int], stamp: Any,
            idle: float) -> tuple[array, array]:  # fmt: skip
    """A subscriber process's side of one ``iox``/``iox-loan`` case: ``(seqs, times)``."""
    data_kind, end_kind = kinds
    iox, node = _iox(case["env"]["domain"])
    pubsub, events = _services(iox, node, case["topic"])
    port = pubsub.subscriber_builder().create()
    listener = events.listener_builder().create()
    waitset = iox.WaitSetBuilder.new().create(iox.ServiceType.Ipc)
    guard = waitset.attach_notification(listener)
    copy = case["transport"] == "iox"
    seqs, times = array("q"), array("q")
    case["ready"]()
    quiet_since = time.monotonic()
    try:
        while time.monotonic() - quiet_since < idle:
            waitset.wait_and_process_with_timeout(iox.Duration.from_secs_f64(0.25))
            listener.try_wait()
            while True:
                sample = port.receive()
                if sample is None:
                    break
                quiet_since = time.monotonic()
                if copy:
                    data = ctypes.string_at(sample.payload_ptr, sample.header.number_of_elements)
                    seq, kind = head.unpack_from(data)
                else:
                    seq, kind = head.unpack(ctypes.string_at(sample.payload_ptr, head.size))
                t = stamp()
                sample.delete()
                if kind == end_kind:
                    return seqs, times
                if kind == data_kind:
                    seqs.append(seq)
                    times.append(t)
    finally:
        for item in (guard, waitset, listener, port):
            item.delete()
    return seqs, times
