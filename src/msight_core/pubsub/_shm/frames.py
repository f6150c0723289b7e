"""The layout of one shared-memory sample (pure Python, no iceoryx2).

Every sample starts with a 32-byte header (little-endian)::

    magic    H   0x4D53 ("MS")
    version  B   1
    kind     B   1 = one message, 2 = a batch of small messages
    offset   H   where the message (or the first record) starts, from the sample start
    reserved H   0
    source   Q   random id of the sending port: counts of lost samples are kept per source
    first    Q   index of the first message of this sample in that source's stream
    value    Q   kind 1: the message length; kind 2: the number of records

A single message starts at the next 64-byte boundary of the mapped address, so
arrays that :class:`~msight_core.data.Data` aligns inside the message stay
aligned in every process. A batch holds ``value`` records ``(length u32,
bytes)`` back to back, right after the header.

Samples come from other processes and are not trusted: :func:`parse` and
:func:`split` check every offset, count and length against the bytes present;
a bad sample raises :class:`FrameError` and costs that sample only.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = [
    "ALIGN",
    "BATCH",
    "HEADER_SIZE",
    "RECORD",
    "SINGLE",
    "FrameError",
    "Header",
    "batch_body",
    "pack",
    "parse",
    "single_offset",
    "split",
]

MAGIC = 0x4D53
VERSION = 1
SINGLE = 1
BATCH = 2
ALIGN = 64

_HEAD = struct.Struct("<HBBHHQQQ")
HEADER_SIZE = _HEAD.size  # 32
RECORD = struct.Struct("<I")
_RECORD_SIZE = RECORD.size


class FrameError(ValueError):
    """A sample that does not follow this layout (a foreign or broken writer)."""


class Header(NamedTuple):
    kind: int
    offset: int
    source: int
    first: int
    value: int
    """Kind 1: the message length; kind 2: the number of records."""

    @property
    def messages(self) -> int:
        return 1 if self.kind == SINGLE else self.value


def single_offset(address: int) -> int:
    """Offset of a single message in a sample mapped at ``address`` (64-byte aligned)."""
    return HEADER_SIZE + (-(address + HEADER_SIZE) % ALIGN)


def pack(kind: int, offset: int, source: int, first: int, value: int) -> bytes:
    """The 32 header bytes."""
    return _HEAD.pack(MAGIC, VERSION, kind, offset, 0, source, first, value)


def batch_body(messages: list[bytes]) -> bytes:
    """The records of a batch, back to back."""
    parts: list[bytes] = []
    append = parts.append
    pack_len = RECORD.pack
    for message in messages:
        append(pack_len(len(message)))
        append(message)
    return b"".join(parts)


def parse(head: bytes, size: int) -> Header:
    """Validate the header of a ``size``-byte sample whose first bytes are ``head``.

    Raises:
        FrameError: wrong magic or version, unknown kind, or an offset or count
            the sample cannot hold.
    """
    if size < HEADER_SIZE or len(head) < HEADER_SIZE:
        raise FrameError(f"sample of {size} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, kind, offset, _, source, first, value = _HEAD.unpack_from(head)
    if magic != MAGIC:
        raise FrameError("not an msight shm sample (bad magic)")
    if version != VERSION:
        raise FrameError(f"unsupported shm sample version {version}")
    if kind == SINGLE:
        if not HEADER_SIZE <= offset <= HEADER_SIZE + ALIGN or offset + value > size:
            raise FrameError(
                f"message of {value} bytes at offset {offset} does not fit a {size}-byte sample"
            )
    elif kind == BATCH:
        if offset != HEADER_SIZE or not 1 <= value <= (size - offset) // _RECORD_SIZE:
            raise FrameError(f"batch sample with a bad offset or record count ({value})")
    else:
        raise FrameError(f"unknown shm sample kind {kind}")
    return Header(kind, offset, source, first, value)


def split(body: bytes, count: int) -> tuple[list[bytes], bool]:
    """The ``count`` messages of a batch body; ``(messages, complete)``.

    Stops at the first record that does not fit the bytes left: the records
    before it are returned, ``complete`` is then ``False``. Trailing bytes after
    ``count`` records also make it ``False``.
    """
    view = memoryview(body)
    size = len(view)
    out: list[bytes] = []
    append = out.append
    unpack_len = RECORD.unpack_from
    pos = 0
    for _ in range(count):
        if pos + _RECORD_SIZE > size:
            return out, False
        (length,) = unpack_len(view, pos)
        pos += _RECORD_SIZE
        end = pos + length
        if end > size:
            return out, False
        append(bytes(view[pos:end]))
        pos = end
    return out, pos == size
