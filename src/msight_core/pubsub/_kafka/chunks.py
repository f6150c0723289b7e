"""The wire format of frames split to fit a topic's ``max.message.bytes``.

A frame larger than its topic allows travels as consecutive records with one
key (so one partition, in order), each carrying the ``msight.chunk`` header:
the frame id (16 bytes: 8 identify the publisher instance, 8 count its frames),
the chunk index and the chunk count (:data:`CHUNK_STRUCT`). Frames within the
limit are plain records whose value is exactly the published bytes.

:class:`FrameIds` and :func:`split` are the publishing side;
:class:`Reassembler` is the receiving side. Pure Python, no client calls.
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
    "RECORD_OVERHEAD",
    "FrameIds",
    "Reassembler",
    "split",
]

logger = logging.getLogger("msight_core.pubsub.kafka")

#: Header carried by each piece of a frame split to fit a topic's limit.
CHUNK_HEADER = "msight.chunk"
#: frame id (16 bytes), chunk index, chunk count.
CHUNK_STRUCT = struct.Struct(">16sII")
#: Room left in each record for the record batch framing, key and headers.
RECORD_OVERHEAD = 4096
#: Seconds an unfinished frame waits for its next chunk before it is dropped.
FRAME_TIMEOUT = 60.0
_PUBLISHER_ID = 8  # leading bytes of a frame id naming the publisher instance

Key = tuple  # (topic, partition)
Headers = list[tuple[str, bytes]]


class FrameIds:
    """Frame ids of one publisher instance: a random prefix and a counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(_PUBLISHER_ID)
        self._seq = itertools.count()

    def next(self) -> bytes:
        return self._prefix + next(self._seq).to_bytes(16 - _PUBLISHER_ID, "big")


def split(data: bytes, limit: int, frame_id: bytes) -> Iterator[tuple[bytes, Headers]]:
    """``(value, headers)`` of each record carrying ``data`` in records of ``limit`` bytes.

    ``limit`` is the largest record value the topic takes; the header's size is
    taken off it.
    """
    size = limit - CHUNK_STRUCT.size - len(CHUNK_HEADER) - 64
    count = -(-len(data) // size)
    view = memoryview(data)
    for index in range(count):
        headers = [(CHUNK_HEADER, CHUNK_STRUCT.pack(frame_id, index, count))]
        yield bytes(view[index * size : (index + 1) * size]), headers


class _Frame:
    __slots__ = ("count", "first", "parts", "started")

    def __init__(self, first: int, count: int) -> None:
        self.first = first
        self.parts: list[bytes] = []
        self.count = count
        self.started = time.monotonic()


class Reassembler:
    """Joins the chunks of split frames, per partition. One thread only.

    ``partial`` maps each partition with an unfinished frame to its frames; it
    is empty when nothing is pending, which lets the caller skip the
    bookkeeping for plain records.
    """

    def __init__(self) -> None:
        self.partial: dict[Key, dict[bytes, _Frame]] = {}
        self.dropped = 0
        """Frames given up unfinished (a chunk missing, or too late)."""

    def add(self, key: Key, offset: int, header: bytes, data: bytes | None) -> bytes | None:
        """Take the chunk at ``offset``; return the whole frame once its last chunk came.

        A malformed header, a chunk out of sequence or the middle of a frame whose
        start was not seen (a subscriber that started at "latest", a replay) is
        skipped (``None``); an unfinished frame is dropped and counted.
        """
        try:
            frame_id, index, count = CHUNK_STRUCT.unpack(header)
        except struct.error:
            logger.warning(
                "malformed %s header on %s offset %d: skipped", CHUNK_HEADER, key, offset
            )
            return None
        frames = self.partial.setdefault(key, {})
        frame = frames.get(frame_id)
        if index == 0:
            prefix = frame_id[:_PUBLISHER_ID]
            for old_id in [f for f in frames if f[:_PUBLISHER_ID] == prefix]:
                # The same publisher started another frame: that one will not finish.
                del frames[old_id]
                self._dropped(key, "its publisher started a new frame")
            frame = frames[frame_id] = _Frame(offset, count)
        elif frame is None or index != len(frame.parts) or count != frame.count:
            if frame is not None:
                del frames[frame_id]
                self._dropped(key, "a chunk is missing")
            if not frames:
                self.partial.pop(key, None)
            return None
        frame.parts.append(data or b"")
        if len(frame.parts) < count:
            return None
        del frames[frame_id]
        if not frames:
            self.partial.pop(key, None)
        return b"".join(frame.parts)

    def first_offset(self, key: Key, default: int) -> int:
        """Offset of the first chunk of ``key``'s oldest unfinished frame, else ``default``.

        A committed offset must not pass it, or a restart would lose the frame.
        """
        frames = self.partial.get(key)
        return min(f.first for f in frames.values()) if frames else default

    def forget(self, keys: set[Key]) -> None:
        """Drop the unfinished frames of partitions no longer read here."""
        for key in keys:
            self.partial.pop(key, None)

    def evict(self, now: float) -> None:
        """Drop frames that waited longer than :data:`FRAME_TIMEOUT` for a chunk."""
        for key, frames in list(self.partial.items()):
            for frame_id, frame in list(frames.items()):
                if now - frame.started > FRAME_TIMEOUT:
                    del frames[frame_id]
                    self._dropped(key, f"no chunk for {FRAME_TIMEOUT:g}s")
            if not frames:
                del self.partial[key]

    def _dropped(self, key: Key, why: str) -> None:
        self.dropped += 1
        logger.warning("dropped an incomplete split frame on %s partition %d: %s", *key, why)
