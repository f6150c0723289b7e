"""The wire format of frames split to fit a topic's ``max.message.bytes``.

A frame larger than its topic allows travels as consecutive records in one
partition, each carrying the ``msight.chunk`` header (:data:`CHUNK_STRUCT`):
the frame id (16 bytes: 8 identify the publisher instance, 8 count its
frames), the chunk index, the chunk count and the frame's total size. Every
chunk but the last has the same size. (Headers of 24 bytes, without the total
size, come from earlier msight versions and are still read.) Frames within the
limit are plain records whose value is exactly the published bytes.

:class:`FrameIds` and :func:`split` are the publishing side;
:class:`Reassembler` is the receiving side. Pure Python, no client calls.

Chunk headers are peer input. Index, count and total size are checked against
each other, against the bytes present and against the reassembler's byte
bound before anything is kept; unfinished frames are bounded in number (per
partition and in all), in bytes (the oldest is dropped to make room) and in
time (:data:`FRAME_TIMEOUT` without a chunk). A dropped or malformed frame
costs that frame only: it is counted in :attr:`Reassembler.dropped` and
logged (at most every few seconds), and the offset it pinned is released.
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
import time
from collections.abc import Iterator

__all__ = [
    "CHUNK_HEADER",
    "CHUNK_STRUCT",
    "FRAME_TIMEOUT",
    "MAX_OPEN_FRAMES",
    "RECORD_OVERHEAD",
    "FrameIds",
    "Reassembler",
    "split",
]

logger = logging.getLogger("msight_core.pubsub.kafka")

#: Header carried by each piece of a frame split to fit a topic's limit.
CHUNK_HEADER = "msight.chunk"
#: frame id (16 bytes), chunk index, chunk count, frame size.
CHUNK_STRUCT = struct.Struct(">16sIIQ")
_CHUNK_V1 = struct.Struct(">16sII")  # earlier msight versions: no frame size
#: Room left in each record for the record batch framing, key and headers.
RECORD_OVERHEAD = 4096
#: Seconds an unfinished frame waits for its next chunk before it is dropped.
FRAME_TIMEOUT = 10.0
#: Unfinished frames kept per partition (and 8 times that in all).
MAX_OPEN_FRAMES = 8
_PUBLISHER_ID = 8  # leading bytes of a frame id naming the publisher instance
_LOG_INTERVAL = 10.0

Key = tuple  # (topic, partition)
Headers = list[tuple[str, bytes]]


class FrameIds:
    """Frame ids of one publisher instance: a random prefix and a counter."""

    def __init__(self) -> None:
        self.prefix = os.urandom(_PUBLISHER_ID)
        """The publisher instance's random id (also in its sequence stamps)."""
        self._seq = itertools.count()

    def next(self) -> bytes:
        return self.prefix + next(self._seq).to_bytes(16 - _PUBLISHER_ID, "big")


def split(data: bytes, limit: int, frame_id: bytes) -> Iterator[tuple[bytes, Headers]]:
    """``(value, headers)`` of each record carrying ``data`` in records of ``limit`` bytes.

    ``limit`` is the largest record value the topic takes; the header's size is
    taken off it.
    """
    size = limit - CHUNK_STRUCT.size - len(CHUNK_HEADER) - 64
    total = len(data)
    count = -(-total // size)
    view = memoryview(data)
    for index in range(count):
        headers = [(CHUNK_HEADER, CHUNK_STRUCT.pack(frame_id, index, count, total))]
        yield bytes(view[index * size : (index + 1) * size]), headers


class _Frame:
    __slots__ = ("count", "first", "nbytes", "parts", "size", "total", "touched")

    def __init__(self, first: int, count: int, size: int, total: int | None) -> None:
        self.first = first  # offset of the first chunk
        self.parts: list[bytes] = []
        self.count = count
        self.size = size  # bytes of every chunk but the last
        self.total = total  # declared frame size (None: an earlier msight version)
        self.nbytes = 0
        self.touched = time.monotonic()


class Reassembler:
    """Joins the chunks of split frames, per partition. One thread only.

    Args:
        max_bytes: bytes held in unfinished frames at most; a frame that
            cannot fit is dropped, older frames make room for a newer one.

    ``partial`` maps each partition with an unfinished frame to its frames; it
    is empty when nothing is pending, which lets the caller skip the
    bookkeeping for plain records.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.partial: dict[Key, dict[bytes, _Frame]] = {}
        self.nbytes = 0
        """Bytes held in unfinished frames."""
        self.dropped = 0
        """Frames given up (malformed, a chunk missing, too late, too big, too many)."""
        self._last_log: dict[str, float] = {}

    def add(self, key: Key, offset: int, header: bytes, data: bytes | None) -> tuple | None:
        """Take the chunk at ``offset``; once a frame's last chunk came, return
        ``(frame, offset of its first chunk)``.

        A malformed header, a chunk out of sequence or the middle of a frame whose
        start was not seen (a subscriber that started at "latest", a replay) is
        skipped (``None``); an unfinished frame is dropped and counted.
        """
        data = data or b""
        if len(header) == CHUNK_STRUCT.size:
            frame_id, index, count, total = CHUNK_STRUCT.unpack(header)
        elif len(header) == _CHUNK_V1.size:
            frame_id, index, count = _CHUNK_V1.unpack(header)
            total = None
        else:
            self._refuse(key, offset, "a malformed chunk header")
            return None
        frames = self.partial.get(key)
        frame = frames.get(frame_id) if frames else None
        if index == 0:
            why = self._check_first(len(data), count, total)
            if why:
                self._refuse(key, offset, why)
                return None
            if frames:
                prefix = frame_id[:_PUBLISHER_ID]
                for old_id in [f for f in frames if f[:_PUBLISHER_ID] == prefix]:
                    # The same publisher started another frame: that one will not finish.
                    self._drop(key, old_id, "its publisher started a new frame")
            frames = self.partial.setdefault(key, {})
            frame = frames[frame_id] = _Frame(offset, count, len(data), total)
            self._make_room(key, frame, len(data))
            if frame_id not in frames:
                return None  # it could not fit
        elif frame is None:
            return None  # the middle of a frame whose start was not seen here
        else:
            last = index == frame.count - 1
            if index != len(frame.parts) or count != frame.count:
                self._drop(key, frame_id, "a chunk is missing")
                return None
            if not last and len(data) != frame.size or last and not self._fits_last(frame, data):
                self._drop(key, frame_id, "a chunk of the wrong size")
                return None
            self._make_room(key, frame, len(data))
            if frame_id not in frames:
                return None
        frame.parts.append(data)
        frame.nbytes += len(data)
        self.nbytes += len(data)
        frame.touched = time.monotonic()
        if len(frame.parts) < frame.count:
            return None
        self._remove(key, frame_id)
        return b"".join(frame.parts), frame.first

    def _check_first(self, size: int, count: int, total: int | None) -> str:
        if count < 2 or size < 1:
            return "a malformed chunk header"
        if total is not None and not (count - 1) * size < total <= count * size:
            return "chunk count, size and frame size do not agree"
        if (total if total is not None else count * size) > self.max_bytes:
            return (
                f"frame larger than {self.max_bytes} bytes (the receive queue's byte bound, "
                "MSIGHT_QUEUE_MAX_BYTES)"
            )
        return ""

    @staticmethod
    def _fits_last(frame: _Frame, data: bytes) -> bool:
        if frame.total is None:
            return 0 < len(data) <= frame.size
        return len(data) == frame.total - (frame.count - 1) * frame.size

    def _make_room(self, key: Key, frame: _Frame, size: int) -> None:
        """Drop older frames (then this one) until ``size`` more bytes fit and the
        number of open frames is within bounds."""
        frames = self.partial[key]
        while len(frames) > MAX_OPEN_FRAMES:
            self._drop(key, next(iter(frames)), "too many unfinished frames in the partition")
        while self.nbytes + size > self.max_bytes or self._open() > 8 * MAX_OPEN_FRAMES:
            oldest = min(
                ((k, fid, f) for k, fs in self.partial.items() for fid, f in fs.items()),
                key=lambda entry: entry[2].touched if entry[2] is not frame else float("inf"),
            )
            self._drop(oldest[0], oldest[1], "unfinished frames over the subscriber's byte bound")
            if oldest[2] is frame:
                return

    def _open(self) -> int:
        return sum(len(frames) for frames in self.partial.values())

    def first_offset(self, key: Key, default: int) -> int:
        """Offset of the first chunk of ``key``'s oldest unfinished frame, else ``default``.

        A committed offset must not pass it, or a restart would lose the frame.
        """
        frames = self.partial.get(key)
        return min(default, min(f.first for f in frames.values())) if frames else default

    def forget(self, keys: set[Key]) -> None:
        """Drop the unfinished frames of partitions no longer read here."""
        for key in keys:
            for frame in self.partial.pop(key, {}).values():
                self.nbytes -= frame.nbytes

    def evict(self, now: float) -> None:
        """Drop frames that waited longer than :data:`FRAME_TIMEOUT` for a chunk."""
        for key, frames in list(self.partial.items()):
            for frame_id, frame in list(frames.items()):
                if now - frame.touched > FRAME_TIMEOUT:
                    self._drop(key, frame_id, f"no chunk for {FRAME_TIMEOUT:g}s")

    def _remove(self, key: Key, frame_id: bytes) -> _Frame:
        frames = self.partial[key]
        frame = frames.pop(frame_id)
        self.nbytes -= frame.nbytes
        if not frames:
            del self.partial[key]
        return frame

    def _drop(self, key: Key, frame_id: bytes, why: str) -> None:
        self._remove(key, frame_id)
        self._refuse(key, -1, why)

    def _refuse(self, key: Key, offset: int, why: str) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_log.get(why, -_LOG_INTERVAL) >= _LOG_INTERVAL:
            if len(self._last_log) > 100:
                self._last_log.clear()
            self._last_log[why] = now
            where = f" offset {offset}" if offset >= 0 else ""
            logger.warning(
                "dropped a split frame on %s partition %d%s: %s (%d dropped so far)",
                key[0],
                key[1],
                where,
                why,
                self.dropped,
            )
