"""Copies of large frames, split over two cores.

One core copies about 4 GB/s on the machines this was measured on (a 16 MB
frame: ~4 ms), two cores about 7 GB/s. A frame of :data:`PARALLEL_BYTES` or
more is copied in two halves: the second by a helper thread, the first by the
caller; ``ctypes.memmove`` lets go of the GIL, so both run at once. Smaller
copies, and machines with one core, stay in the caller.

:func:`to_bytes` makes the ``bytes`` of a received frame the same way: it asks
CPython for an uninitialized ``bytes`` object (``PyBytes_FromStringAndSize(NULL,
n)``, as C extensions do) and fills it before anyone else sees it. Elsewhere
(no ``ctypes.pythonapi``) it is ``ctypes.string_at``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["PARALLEL_BYTES", "copy", "copy_from_bytes", "to_bytes"]

logger = logging.getLogger("msight_core.pubsub.shm")

#: Copies at least this large use two cores.
PARALLEL_BYTES = 4 * 1024 * 1024

_memmove = ctypes.memmove
_string_at = ctypes.string_at
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

try:
    _new_bytes: Any = ctypes.pythonapi.PyBytes_FromStringAndSize
    _new_bytes.restype = ctypes.py_object
    _new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    _bytes_data: Any = ctypes.pythonapi.PyBytes_AsString
    _bytes_data.restype = ctypes.c_void_p
    _bytes_data.argtypes = (ctypes.py_object,)
except (AttributeError, ValueError):  # pragma: no cover - not CPython
    _new_bytes = _bytes_data = None


def _helper() -> ThreadPoolExecutor | None:
    global _pool, _pool_pid
    if _CORES < 2:
        return None
    pool = _pool
    if pool is not None and _pool_pid == os.getpid():
        return pool
    with _lock:
        if _pool is None or _pool_pid != os.getpid():  # a forked child starts its own
            _pool = ThreadPoolExecutor(1, thread_name_prefix="msight-shm-copy")
            _pool_pid = os.getpid()
        return _pool


def copy(dst: int, src: int, n: int) -> None:
    """``memmove(dst, src, n)``; on two cores when ``n >= PARALLEL_BYTES``."""
    pool = _helper() if n >= PARALLEL_BYTES else None
    if pool is None:
        _memmove(dst, src, n)
        return
    half = (n // 2) & ~4095  # page-aligned split
    try:
        future = pool.submit(_memmove, dst + half, src + half, n - half)
    except RuntimeError:  # the pool shut down (interpreter exit): copy alone
        _memmove(dst, src, n)
        return
    _memmove(dst, src, half)
    future.result()


def copy_from_bytes(dst: int, data: bytes, n: int) -> None:
    """Copy the first ``n`` bytes of ``data`` to ``dst`` (see :func:`copy`)."""
    if n < PARALLEL_BYTES or _bytes_data is None:
        _memmove(dst, data, n)
    else:
        copy(dst, _bytes_data(data), n)


def to_bytes(src: int, n: int) -> bytes:
    """A ``bytes`` copy of ``n`` bytes at address ``src``."""
    if n < PARALLEL_BYTES or _new_bytes is None or _CORES < 2:
        return _string_at(src, n)  # type: ignore[no-any-return]
    out = _new_bytes(None, n)
    copy(_bytes_data(out), src, n)
    return out  # type: ignore[no-any-return]
