"""The msight Data wire format (private; see :mod:`msight_core.data` for the public API).

A message is::

    fixed header (20 bytes, little-endian)
        magic      4s   b"\\x89MSD"
        version    B    1
        flags      B    0 (reserved)
        tag_len    H    length of the type tag
        meta_len   I    length of the metadata
        n_buffers  I    entries in the buffer table
        crc32      I    CRC-32 of the header's first 16 bytes, tag, metadata and table
    tag        UTF-8 type tag (the registered name of the Data subclass)
    metadata   UTF-8 JSON object: field name -> encoded value
    table      n_buffers x (offset u64, length u64), offsets from the message start
    buffers    raw array/bytes payloads, each starting at a 64-byte aligned offset

Scalars, strings, lists and str-keyed dicts are plain JSON. Everything else is a
one-key-marker JSON object: ``{"$a": i, "d": dtype, "s": shape}`` (numpy array in
buffer ``i``), ``{"$b": i}`` (bytes), ``{"$t": [...]}`` (tuple), ``{"$d": [[k, v],
...]}`` (dict with non-str or ``$``-prefixed keys), ``{"$g": dtype, "v": x}`` (numpy
scalar) and ``{"$D": tag, "f": {...}}`` (nested Data).

Big payloads are never copied into the metadata: serialization joins the header
and the buffers in one pass (one copy of each array), and deserialization hands
back ``np.frombuffer`` views over the received bytes (no copy). The CRC protects
the header and metadata; array contents are not checksummed (the transport's job).

Decoding treats the message as hostile (any process that can publish can send one):

- Decoding a message of N bytes never allocates more than a small constant times
  N plus a fixed bound. Every length, size, count and index read from the message
  (``tag_len``, ``meta_len``, ``n_buffers``, table offsets and lengths, buffer
  references, array shapes) is checked against the bytes actually present before
  anything is allocated for it.
- Each buffer is referenced at most once by the metadata: ``{"$b": i}`` copies its
  buffer into a ``bytes``, so a buffer referenced many times would multiply the
  message; an ``{"$a": i}`` array is a view and never copies. A buffer no field
  references (a field this version does not know) is skipped.
- Plain JSON lists and objects are decoded in place, not rebuilt; ``{"$d": ...}``
  keys whose hashes collide more than a few times are refused (Python's int and
  tuple hashes are not randomized: colliding keys would make one dict cost
  quadratic time).
- Every problem is a :class:`~msight_core.errors.DeserializationError`.
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ..errors import DeserializationError, SerializationError

__all__ = [
    "ALIGN",
    "MAGIC",
    "VERSION",
    "Buffers",
    "Decoder",
    "Encoder",
    "pack",
    "pack_into",
    "packed_size",
    "unpack",
]

MAGIC = b"\x89MSD"
VERSION = 1
ALIGN = 64
MAX_DEPTH = 64
MAX_NDIM = 32
#: Most keys of one ``$d`` dict that may share a hash value (see the module docstring).
MAX_HASH_COLLISIONS = 8

_HEAD = struct.Struct("<4sBBHII")  # first 16 bytes, before the CRC
_CRC = struct.Struct("<I")
_ENTRY = struct.Struct("<QQ")  # one buffer table entry: offset, length
_EAGER_VIEWS = 64  # tables up to this long are returned as a list of views (fixed cost)
_HEADER_SIZE = _HEAD.size + _CRC.size
_ZEROS = bytes(ALIGN)

# (kind, itemsize) pairs whose layout is the same on every platform.
_DTYPES = {
    ("b", 1),
    ("i", 1), ("i", 2), ("i", 4), ("i", 8),
    ("u", 1), ("u", 2), ("u", 4), ("u", 8),
    ("f", 2), ("f", 4), ("f", 8),
    ("c", 8), ("c", 16),
}  # fmt: skip
_DTYPE_RE = re.compile(r"([<>|])([biufc])([0-9]{1,2})")
_MARKERS = {"$a", "$b", "$t", "$d", "$g", "$D"}
_SCALARS = (str, int, float, bool, type(None))


def _dtype_str(dtype: np.dtype, where: str) -> str:
    if (dtype.kind, dtype.itemsize) not in _DTYPES or dtype.fields is not None:
        raise SerializationError(
            f"{where}: numpy dtype {dtype} is not supported (use bool, int8-64, uint8-64, "
            "float16/32/64 or complex64/128)"
        )
    return dtype.str


def _parse_dtype(text: Any) -> np.dtype:
    if type(text) is not str:
        raise DeserializationError("array dtype is not a string")
    match = _DTYPE_RE.fullmatch(text)
    if match is None or (match[2], int(match[3])) not in _DTYPES:
        raise DeserializationError(f"array dtype {text[:20]!r} is not allowed")
    return np.dtype(text)


class Encoder:
    """Turns field values into JSON-able metadata plus a list of raw buffers."""

    __slots__ = ("_data_fields", "buffers")

    def __init__(self, data_fields: Callable[[Any], tuple[str, dict[str, Any]]]) -> None:
        # data_fields(obj) -> (tag, {field name: value}) for a Data instance, or raises
        # TypeError when obj is not one.
        self.buffers: list[memoryview] = []
        self._data_fields = data_fields

    def fields(self, values: dict[str, Any], where: str, depth: int = 0) -> dict[str, Any]:
        return {name: self.value(v, f"{where}.{name}", depth + 1) for name, v in values.items()}

    def _buffer(self, mv: memoryview) -> int:
        self.buffers.append(mv)
        return len(self.buffers) - 1

    def value(self, v: Any, where: str, depth: int) -> Any:
        if isinstance(v, _SCALARS) and not isinstance(v, np.generic):
            if type(v) in _SCALARS:
                return v
            # Subclasses (IntEnum, str enums ...) travel as their base value.
            for base in (bool, int, float, str):
                if isinstance(v, base):
                    return base(v)
        if depth > MAX_DEPTH:
            raise SerializationError(f"{where}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(v, np.ndarray):
            dtype = _dtype_str(v.dtype, where)
            if v.ndim > MAX_NDIM:
                raise SerializationError(f"{where}: more than {MAX_NDIM} dimensions")
            flat = np.ascontiguousarray(v).reshape(-1).view(np.uint8)
            return {"$a": self._buffer(memoryview(flat)), "d": dtype, "s": list(v.shape)}
        if isinstance(v, (bytes, bytearray, memoryview)):
            mv = memoryview(v)
            if not mv.c_contiguous:
                mv = memoryview(mv.tobytes())
            return {"$b": self._buffer(mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv)}
        if isinstance(v, list):
            return [self.value(x, where, depth + 1) for x in v]
        if isinstance(v, tuple):
            return {"$t": [self.value(x, where, depth + 1) for x in v]}
        if isinstance(v, dict):
            if all(type(k) is str and not k.startswith("$") for k in v):
                return {k: self.value(x, f"{where}.{k}", depth + 1) for k, x in v.items()}
            return {
                "$d": [
                    [self._key(k, where, depth + 1), self.value(x, where, depth + 1)]
                    for k, x in v.items()
                ]
            }
        if isinstance(v, np.generic):
            dtype = _dtype_str(v.dtype, where)
            item = v.item()
            if isinstance(item, complex):
                item = [item.real, item.imag]
            return {"$g": dtype, "v": item}
        try:
            tag, values = self._data_fields(v)
        except TypeError:
            raise SerializationError(
                f"{where}: cannot serialize a {type(v).__name__} (supported: None, bool, "
                "int, float, str, bytes, list, tuple, dict, numpy arrays and scalars, Data)"
            ) from None
        return {"$D": tag, "f": self.fields(values, where, depth + 1)}

    def _key(self, k: Any, where: str, depth: int) -> Any:
        if isinstance(k, (np.ndarray, bytes, bytearray, memoryview, list, dict)):
            raise SerializationError(f"{where}: dict key of type {type(k).__name__}")
        return self.value(k, where, depth)


class Buffers(Sequence[memoryview]):
    """The buffer table of a validated message: views made on demand, never stored.

    A hostile table may hold up to N/16 entries; keeping a view per entry would cost
    ~12 times the message. Entries are read with ``struct`` when asked for.
    """

    __slots__ = ("_mv", "_n", "_table")

    def __init__(self, mv: memoryview, table: int, n: int) -> None:
        self._mv, self._table, self._n = mv, table, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._n))]
        if not -self._n <= index < self._n:
            raise IndexError("buffer index out of range")
        offset, length = _ENTRY.unpack_from(self._mv, self._table + 16 * (index % self._n))
        return self._mv[offset : offset + length]

    def __iter__(self) -> Iterator[memoryview]:
        return (self[i] for i in range(self._n))


def _no_build(tag: str, fields: Any, depth: int) -> Any:
    raise DeserializationError("decoder released")


class Decoder:
    """Rebuilds values from metadata over the message's buffers (zero-copy arrays).

    Lists and str-keyed dicts of the metadata are reused (their items replaced in
    place), so a decoded value costs no more than the parsed JSON it came from.
    """

    __slots__ = ("_build", "_count", "_used", "views")

    def __init__(self, views: Sequence[memoryview], build: Callable[[str, Any, int], Any]) -> None:
        # build(tag, encoded_fields, depth) -> Data instance for a nested "$D" value.
        self.views = views
        self._build = build
        self._count = len(views)
        self._used = bytearray(self._count)  # at most N/16 bytes: one flag per buffer

    def release(self) -> None:
        """Drop the buffer views and the build callback (decoding is over)."""
        self.views = ()
        self._build = _no_build

    def _view(self, index: Any) -> memoryview:
        if type(index) is not int or not 0 <= index < self._count:
            raise DeserializationError(f"buffer reference {index!r} out of range")
        if self._used[index]:
            raise DeserializationError(f"buffer {index} is referenced more than once")
        self._used[index] = 1
        return self.views[index]

    def value(self, v: Any, depth: int) -> Any:
        t = type(v)
        if t is list:
            if depth > MAX_DEPTH:
                raise DeserializationError(f"nested deeper than {MAX_DEPTH} levels")
            for i, x in enumerate(v):
                if type(x) is list or type(x) is dict:
                    v[i] = self.value(x, depth + 1)
            return v
        if t is not dict:
            return v  # str, int, float, bool, None: json.loads produces nothing else
        if depth > MAX_DEPTH:
            raise DeserializationError(f"nested deeper than {MAX_DEPTH} levels")
        marker = next((k for k in v if k.startswith("$")), None)
        if marker is None:
            for k, x in v.items():  # replacing values while iterating is allowed
                if type(x) is list or type(x) is dict:
                    v[k] = self.value(x, depth + 1)
            return v
        if marker not in _MARKERS:
            raise DeserializationError(f"unknown value marker {marker[:20]!r}")
        if marker == "$a":
            return self._array(v)
        if marker == "$b":
            self._keys(v, {"$b"})
            return bytes(self._view(v["$b"]))
        if marker == "$t":
            self._keys(v, {"$t"})
            items = v["$t"]
            if type(items) is not list:
                raise DeserializationError("tuple value is not a list")
            for i, x in enumerate(items):
                if type(x) is list or type(x) is dict:
                    items[i] = self.value(x, depth + 1)
            return tuple(items)
        if marker == "$d":
            return self._dict(v, depth)
        if marker == "$g":
            return self._scalar(v)
        self._keys(v, {"$D", "f"})
        tag = v["$D"]
        if type(tag) is not str:
            raise DeserializationError("nested data tag is not a string")
        return self._build(tag, v["f"], depth + 1)

    @staticmethod
    def _keys(v: dict[str, Any], expected: set[str]) -> None:
        if v.keys() != expected:
            raise DeserializationError(f"malformed {min(expected)} value")

    def _dict(self, v: dict[str, Any], depth: int) -> dict[Any, Any]:
        self._keys(v, {"$d"})
        pairs = v["$d"]
        if type(pairs) is not list:
            raise DeserializationError("dict value is not a list of pairs")
        for pair in pairs:
            if type(pair) is not list or len(pair) != 2:
                raise DeserializationError("dict entry is not a [key, value] pair")
            pair[0] = self.value(pair[0], depth + 1)
        try:
            # Counting hash values is linear: they are distinct ints unless they collide.
            hashes = Counter(hash(pair[0]) for pair in pairs)
        except TypeError:
            raise DeserializationError("unhashable dict key") from None
        if hashes and max(hashes.values()) > MAX_HASH_COLLISIONS:
            raise DeserializationError(
                f"more than {MAX_HASH_COLLISIONS} dict keys share one hash value"
            )
        return {pair[0]: self.value(pair[1], depth + 1) for pair in pairs}

    @staticmethod
    def _scalar(v: dict[str, Any]) -> Any:
        Decoder._keys(v, {"$g", "v"})
        dtype = _parse_dtype(v["$g"])
        item = v["v"]
        if dtype.kind == "c":
            if (
                type(item) is not list
                or len(item) != 2
                or any(type(x) not in (int, float) for x in item)
            ):
                raise DeserializationError("complex scalar is not [real, imag]")
            item = complex(float(item[0]), float(item[1]))
        elif type(item) not in (int, float, bool):
            raise DeserializationError("numpy scalar value is not a number")
        try:
            return dtype.type(item)
        except (OverflowError, ValueError, TypeError):
            raise DeserializationError(f"numpy scalar value does not fit a {dtype}") from None

    def _array(self, v: dict[str, Any]) -> np.ndarray:
        self._keys(v, {"$a", "d", "s"})
        dtype = _parse_dtype(v["d"])
        shape = v["s"]
        if (
            type(shape) is not list
            or len(shape) > MAX_NDIM
            or any(type(n) is not int or not 0 <= n <= sys.maxsize for n in shape)
        ):
            raise DeserializationError("array shape is not a list of non-negative ints")
        view = self._view(v["$a"])
        count = math.prod(shape)
        # An empty array still has numpy's size limit on its other dimensions: a
        # zero-length buffer must not carry (0, 2**62, 2**62) into reshape().
        if count * dtype.itemsize != len(view) or (
            count == 0 and math.prod(n for n in shape if n) * dtype.itemsize > sys.maxsize
        ):
            raise DeserializationError(
                f"array of shape {tuple(shape)} and dtype {dtype} does not match its "
                f"{len(view)}-byte buffer"
            )
        return np.frombuffer(view, dtype=dtype).reshape(shape)


def _layout(tag: str, meta: dict[str, Any], buffers: Sequence[memoryview]) -> tuple[list[Any], int]:
    """The pieces of one message in order (padding included) and its total size."""
    try:
        tag_b = tag.encode("utf-8")
        meta_b = json.dumps(
            meta, separators=(",", ":"), ensure_ascii=False, allow_nan=True, check_circular=False
        ).encode("utf-8")
    except (ValueError, TypeError, RecursionError) as exc:
        raise SerializationError(f"metadata could not be encoded: {exc}") from exc
    if len(tag_b) > 0xFFFF or len(meta_b) > 0xFFFFFFFF or len(buffers) > 0xFFFFFFFF:
        raise SerializationError("type tag or metadata too large")
    table_end = _HEADER_SIZE + len(tag_b) + len(meta_b) + 16 * len(buffers)
    offsets = []
    pos = table_end
    for mv in buffers:
        pos += -pos % ALIGN
        offsets.append(pos)
        pos += mv.nbytes
    table = struct.pack(
        f"<{2 * len(buffers)}Q", *(x for o, mv in zip(offsets, buffers) for x in (o, mv.nbytes))
    )
    head = _HEAD.pack(MAGIC, VERSION, 0, len(tag_b), len(meta_b), len(buffers))
    crc = zlib.crc32(table, zlib.crc32(meta_b, zlib.crc32(tag_b, zlib.crc32(head))))
    parts: list[Any] = [head, _CRC.pack(crc), tag_b, meta_b, table]
    pos = table_end
    for offset, mv in zip(offsets, buffers):
        if offset > pos:
            parts.append(_ZEROS[: offset - pos])
        parts.append(mv)
        pos = offset + mv.nbytes
    return parts, pos


def pack(tag: str, meta: dict[str, Any], buffers: Sequence[memoryview]) -> bytes:
    """Build one message: a single allocation, each buffer copied once."""
    return b"".join(_layout(tag, meta, buffers)[0])


def packed_size(tag: str, meta: dict[str, Any], buffers: Sequence[memoryview]) -> int:
    """The size in bytes of the message :func:`pack` would build."""
    return _layout(tag, meta, buffers)[1]


def pack_into(target: Any, tag: str, meta: dict[str, Any], buffers: Sequence[memoryview]) -> int:
    """Write one message at the start of the writable buffer ``target``; return its size.

    The same bytes as :func:`pack`, each buffer copied once, straight into
    ``target`` (shared memory lent by a backend, for instance).

    Raises:
        TypeError: ``target`` is not a writable bytes-like object.
        ValueError: ``target`` is smaller than the message.
    """
    parts, size = _layout(tag, meta, buffers)
    out = memoryview(target)
    if out.readonly:
        raise TypeError("serialize_into() needs a writable buffer, got a read-only one")
    if out.ndim != 1 or out.itemsize != 1:
        out = out.cast("B")
    if len(out) < size:
        raise ValueError(f"buffer of {len(out)} bytes is too small for this {size}-byte message")
    pos = 0
    for part in parts:
        n = part.nbytes if isinstance(part, memoryview) else len(part)
        out[pos : pos + n] = part  # bytes, or a flat "B" view (see Encoder)
        pos += n
    return size


def unpack(data: Any) -> tuple[str, dict[str, Any], Sequence[memoryview]]:
    """Validate a message and return (tag, metadata, buffer views).

    Only the fixed header, the metadata and the table are read; the buffers are
    checked to lie inside the message, in order, without overlapping. Up to
    ``_EAGER_VIEWS`` buffers come as a list of views; a longer table as
    :class:`Buffers`, which makes each view when it is asked for.

    Raises:
        TypeError: ``data`` is not bytes-like.
        DeserializationError: anything wrong with the bytes.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes, bytearray or memoryview, got {type(data).__name__}")
    mv = memoryview(data)
    if mv.ndim != 1 or mv.format != "B" or not mv.c_contiguous:
        mv = memoryview(mv.tobytes())
    size = len(mv)
    if size < _HEADER_SIZE or mv[:4] != MAGIC:
        hint = ""
        if size and (0x80 <= mv[0] <= 0x8F or mv[0] in (0xDE, 0xDF)):
            hint = " (it looks like msgpack: a message from msight-core 2.x?)"
        raise DeserializationError(f"not an msight Data message{hint}")
    _magic, version, flags, tag_len, meta_len, n_buf = _HEAD.unpack_from(mv)
    if version != VERSION:
        raise DeserializationError(
            f"unsupported format version {version} (this msight_core reads version {VERSION})"
        )
    if flags != 0:
        raise DeserializationError(f"unsupported format flags {flags:#x}")
    tag_end = _HEADER_SIZE + tag_len
    meta_end = tag_end + meta_len
    table_end = meta_end + 16 * n_buf
    if table_end > size:
        raise DeserializationError(f"truncated message ({size} bytes, header needs {table_end})")
    (crc,) = _CRC.unpack_from(mv, _HEAD.size)
    if zlib.crc32(mv[_HEADER_SIZE:table_end], zlib.crc32(mv[: _HEAD.size])) != crc:
        raise DeserializationError("header checksum mismatch (corrupted message)")
    try:
        tag = str(mv[_HEADER_SIZE:tag_end], "utf-8")
        meta = json.loads(str(mv[tag_end:meta_end], "utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DeserializationError(f"corrupted metadata: {exc}") from None
    if type(meta) is not dict:
        raise DeserializationError("metadata is not a JSON object")
    eager = n_buf <= _EAGER_VIEWS
    views: list[memoryview] = []
    end = table_end
    for offset, length in _ENTRY.iter_unpack(mv[meta_end:table_end]):
        if offset < end or offset + length > size:
            raise DeserializationError("buffer table points outside the message or overlaps")
        end = offset + length
        if eager:
            views.append(mv[offset:end])
    if end != size:
        raise DeserializationError(f"message length {size} does not match its layout ({end} bytes)")
    return tag, meta, views if eager else Buffers(mv, meta_end, n_buf)
