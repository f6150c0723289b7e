"""Zero-copy views of received samples and the bookkeeping that keeps them safe.

A :class:`ShmView` holds its iceoryx2 sample: the publisher cannot reuse that
memory until the view is released, so what the application reads never
changes under it. The memoryview it hands out is read-only (writing raises
``TypeError``; numpy arrays made from it are read-only), and it is built on a
ctypes object created for this view alone, the *exporter*.

Every memoryview, slice or numpy array derived from the view keeps a reference
to the exporter. So releasing a view checks the exporter's reference count:
when nothing derived from it is left, the sample goes back to the publisher at
once; otherwise the sample is kept (the view counts as held) and released by a
later check, when the arrays are gone. Memory an application still points at is
never handed back, and never unmapped: views still referenced when their
backend closes are kept by this module until the process lets go of them.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
import threading
import weakref
from collections import OrderedDict
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Lease", "Ledger", "ShmView", "exporter"]

logger = logging.getLogger("msight_core.pubsub.shm")

_TYPES: OrderedDict[int, type] = OrderedDict()
_TYPES_MAX = 64
_types_lock = threading.Lock()
# Leases whose memory was still referenced when their backend closed.
_orphans: list[Lease] = []
_orphans_lock = threading.Lock()


def exporter(address: int, size: int) -> Any:
    """A ctypes ``uint8[size]`` at ``address``: the object every derived buffer references.

    Array types are built here rather than with ``c_uint8 * size``, whose cache in
    ctypes never forgets a length (frames of changing sizes would grow it forever);
    the last few lengths are kept.
    """
    with _types_lock:
        array_type = _TYPES.get(size)
        if array_type is None:
            array_type = type(
                "ShmBytes", (ctypes.Array,), {"_type_": ctypes.c_uint8, "_length_": size}
            )
            _TYPES[size] = array_type
            if len(_TYPES) > _TYPES_MAX:
                _TYPES.popitem(last=False)
        else:
            _TYPES.move_to_end(size)
    return array_type.from_address(address)


class Lease:
    """One held sample and the exporter over its payload."""

    __slots__ = ("__weakref__", "exporter", "released", "sample")

    def __init__(self, sample: Any, exporter: Any) -> None:
        self.sample = sample
        self.exporter = exporter
        self.released = False

    def try_release(self) -> bool:
        """Give the sample back if nothing references its memory; True when done."""
        if self.released:
            return True
        # References: our attribute and getrefcount's argument. Any memoryview,
        # slice or array derived from the view adds one (through its buffer).
        if self.exporter is not None and sys.getrefcount(self.exporter) > 2:
            return False
        self.released = True
        self.exporter = None
        sample, self.sample = self.sample, None
        try:
            sample.delete()
        except Exception:  # the port may be gone already
            logger.debug("releasing an shm sample failed", exc_info=True)
        return True


def sweep_orphans() -> None:
    """Release orphaned leases whose memory is no longer referenced."""
    with _orphans_lock:
        if _orphans:
            _orphans[:] = [lease for lease in _orphans if not lease.try_release()]


class Ledger:
    """Counts the views one backend instance holds; thread-safe.

    Args:
        limit: most sample-backed views held at once (``MSIGHT_SHM_MAX_VIEWS``).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # Reentrant: a view collected (its __del__) while this thread holds the lock.
        self._lock = threading.RLock()
        # Weak: a view dropped without release() is collected and releases itself.
        self._live: weakref.WeakSet[ShmView] = weakref.WeakSet()
        self._deferred: list[Lease] = []

    def held(self) -> int:
        """Sample-backed views not yet given back (released ones still referenced included)."""
        with self._lock:
            if self._deferred:
                self._deferred = [lease for lease in self._deferred if not lease.try_release()]
            return sum(1 for view in self._live if view.zero_copy) + len(self._deferred)

    def still_referenced(self) -> int:
        with self._lock:
            return len(self._deferred)

    def add(self, view: ShmView) -> None:
        with self._lock:
            self._live.add(view)

    def done(self, view: ShmView, lease: Lease | None) -> None:
        with self._lock:
            self._live.discard(view)
            if lease is not None and not lease.try_release():
                self._deferred.append(lease)

    def close(self) -> int:
        """Release every view; keep (as orphans) what is still referenced. Returns that count."""
        with self._lock:
            live = list(self._live)
        for view in live:
            view.release()
        with self._lock:
            left = [lease for lease in self._deferred if not lease.try_release()]
            self._deferred = []
        if left:
            with _orphans_lock:
                _orphans.extend(left)
            logger.warning(
                "%d shm view(s) still referenced (numpy arrays or memoryviews made from "
                "them) when the backend closed: their shared memory stays mapped until "
                "they are dropped",
                len(left),
            )
        sweep_orphans()
        return len(left)


class ShmView:
    """A read-only view of one received message, valid until released.

    Use it as a context manager (released on exit) or call :meth:`release`.
    While the view is held the publisher cannot reuse its memory; after release
    ``data`` raises ``ValueError``. Arrays decoded from ``data`` (for example by
    ``Data.deserialize(view.data)``) point into shared memory: keep the view
    until you are done with them; a view released while such arrays are alive
    keeps its sample (and counts as held) until they are gone.

    Thread-safety: ``release()`` may be called from any thread, once or more.

    Attributes:
        topic: the topic the message came from.
        zero_copy: True when ``data`` points into shared memory; False for small
            messages, which travel batched and are handed out as copies.
    """

    __slots__ = ("__weakref__", "_data", "_lease", "_ledger", "topic", "zero_copy")

    def __init__(
        self, topic: str, data: memoryview, lease: Lease | None = None, ledger: Ledger | None = None
    ) -> None:
        self.topic = topic
        self._data = data
        self._lease = lease
        self._ledger = ledger
        self.zero_copy = lease is not None
        if ledger is not None:
            ledger.add(self)

    @property
    def data(self) -> memoryview:
        """The payload: a read-only, 1-D ``memoryview`` of bytes (format ``"B"``).

        Raises:
            ValueError: the view was released.
        """
        data = self._data
        if data is None:
            raise ValueError("this shm view was released")
        return data

    @property
    def released(self) -> bool:
        return self._data is None

    def __len__(self) -> int:
        return 0 if self._data is None else self._data.nbytes

    def tobytes(self) -> bytes:
        """A copy of the payload as ``bytes``."""
        return self.data.tobytes()

    def release(self) -> None:
        """Give the memory back to the publisher (once nothing references it). Idempotent."""
        data, self._data = self._data, None
        if data is None:
            return
        try:
            data.release()
        except BufferError:  # something still exports it: the lease check decides
            pass
        lease, self._lease = self._lease, None
        if self._ledger is not None:
            self._ledger.done(self, lease)
        elif lease is not None and not lease.try_release():  # pragma: no cover
            with _orphans_lock:
                _orphans.append(lease)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # never raise from a finalizer
            self.release()

    def __repr__(self) -> str:
        state = "released" if self._data is None else f"{len(self)} bytes"
        kind = "zero-copy" if self.zero_copy else "copy"
        return f"<ShmView {self.topic!r} {state} {kind}>"
