"""Zero-copy receiving for nodes: messages decoded straight from shared memory.

A backend that offers ``receive_view()`` (the shm backend) hands out read-only
views of shared memory that hold their sample: the publisher cannot reuse that
memory while the view, or any array made from it, is alive. A processing node
decodes each message from its view, so the arrays ``process()`` gets point into
shared memory (no copy), and releases the view when it is done with the message.

The lifetime rule (see docs/reference/nodes.md):

* During ``process()``/``on_message()`` the message's arrays are read-only views
  of shared memory (writing into them raises ``ValueError``).
* Keep the message object beyond the callback (store it, queue it for another
  thread) and the node copies its shared-memory arrays out when the callback
  returns: what you kept stays valid, read-only, and no longer pins shared memory.
* Keep a bare array taken out of the message (``self.last = data.image``) and
  that array keeps its sample pinned (valid, never overwritten) until you drop
  it. At most ``MSIGHT_SHM_MAX_VIEWS`` samples can be pinned; beyond that the
  node receives copies (and says so in the log) until some are dropped. Use
  ``data.image.copy()`` to keep an array without pinning anything.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import numpy as np

__all__ = ["copy_out", "detach", "kept", "weak"]

_MAX_DEPTH = 32


def kept(ref: Any) -> Any:
    """The object behind ``ref`` (a weak reference or a plain object) if still alive."""
    if isinstance(ref, weakref.ref):
        return ref()
    return ref


def weak(obj: Any) -> Any:
    """A weak reference to ``obj``; ``obj`` itself when it cannot be weakly referenced.

    A plain object is always treated as kept (copied out): safe, only slower.
    """
    try:
        return weakref.ref(obj)
    except TypeError:
        return obj


def copy_out(obj: Any, payload: memoryview) -> int:
    """:func:`detach` every array of ``obj`` that points into ``payload``'s memory."""
    start = int(np.frombuffer(payload, np.uint8).ctypes.data)
    return detach(obj, start, start + payload.nbytes)


def detach(obj: Any, lo: int, hi: int) -> int:
    """Replace, inside ``obj``, every numpy array in memory ``[lo, hi)`` by a read-only copy.

    Walks dataclass fields, instance attributes, lists, dicts and tuples (nested
    Data included). Returns how many arrays were copied.
    """
    return _walk_attrs(obj, lo, hi, 0)


def _inside(arr: np.ndarray, lo: int, hi: int) -> bool:
    if arr.size == 0:
        return False
    addr = arr.__array_interface__["data"][0]
    return lo <= addr < hi


def _copy(arr: np.ndarray) -> np.ndarray:
    out = arr.copy()
    out.flags.writeable = False
    return out


def _value(v: Any, lo: int, hi: int, depth: int) -> tuple[Any, int]:
    """``(replacement, copies)`` for one value."""
    if depth > _MAX_DEPTH:
        return v, 0
    if isinstance(v, np.ndarray):
        return (_copy(v), 1) if _inside(v, lo, hi) else (v, 0)
    if isinstance(v, (list, dict)):
        n = 0
        for key, x in list(v.items()) if isinstance(v, dict) else enumerate(v):
            new, k = _value(x, lo, hi, depth + 1)
            if k:
                v[key] = new
                n += k
        return v, n
    if isinstance(v, tuple):
        parts = [_value(x, lo, hi, depth + 1) for x in v]
        n = sum(k for _, k in parts)
        if not n:
            return v, 0
        items = [p for p, _ in parts]
        if hasattr(v, "_fields"):  # a namedtuple
            return type(v)(*items), n
        return tuple(items), n
    if dataclasses.is_dataclass(v) and not isinstance(v, type):  # a nested Data
        return v, _walk_attrs(v, lo, hi, depth + 1)
    return v, 0


def _walk_attrs(obj: Any, lo: int, hi: int, depth: int) -> int:
    names: list[str] = []
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = [f.name for f in dataclasses.fields(obj)]
    attrs = getattr(obj, "__dict__", None)
    if isinstance(attrs, dict):
        names += [k for k in attrs if k not in names]
    n = 0
    for name in names:
        try:
            value = getattr(obj, name)
        except AttributeError:
            continue
        new, k = _value(value, lo, hi, depth)
        if k:
            n += k
            if new is not value:
                object.__setattr__(obj, name, new)  # frozen dataclasses too
    return n
