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
aligned in every process. A batch holds ``value`` messages right after the
header: a table of their lengths (``value`` x u32), then the messages back to
back. The table lets a reader cut the batch into messages in C loops, not one
Python step per message.

Samples come from other processes and are not trusted: :func:`parse` and
:func:`split` check every offset, count and length against the bytes present;
a bad sample raises :class:`FrameError` and costs that sample only.
"""

from __future__ import annotations

import struct
import sys
from array import array
from itertools import accumulate
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
# The length table is read and written as a native array where that is little-endian u32.
_NATIVE = sys.byteorder == "little" and array("I").itemsize == _RECORD_SIZE


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


def length_table(messages: list[bytes]) -> bytes:
    """The u32 little-endian length table of a batch of ``messages`` (each < 4 GiB)."""
    if _NATIVE:
        return array("I", map(len, messages)).tobytes()
    return struct.pack(f"<{len(messages)}I", *map(len, messages))


def batch_body(messages: list[bytes]) -> bytes:
    """A batch body: the length table, then the messages."""
    return length_table(messages) + b"".join(messages)


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

    When the lengths do not add up to the bytes present, the messages that fit
    (in order, up to the first that does not) are returned and ``complete`` is
    ``False``; so it is with trailing bytes, or a table longer than the body.
    """
    body = bytes(body)
    size = len(body)
    start = count * _RECORD_SIZE
    if count < 0 or start > size:
        return [], False
    if _NATIVE:
        lengths = array("I")
        lengths.frombytes(body[:start])
    else:
        lengths = array("L", struct.unpack(f"<{count}I", body[:start]))
    ends = list(accumulate(lengths, initial=start))
    if ends[-1] == size:  # the common case: every message at C speed
        return list(map(body.__getitem__, map(slice, ends, ends[1:]))), True
    fits = 0
    while fits < count and ends[fits + 1] <= size:
        fits += 1
    return [body[ends[i] : ends[i + 1]] for i in range(fits)], False
