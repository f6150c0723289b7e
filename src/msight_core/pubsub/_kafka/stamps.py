"""The sequence stamp of msight Kafka records, and the publishing side: :class:`Stamper`.

Each msight publisher instance has a random 8-byte id and, per topic, a
sequence number counting its messages from 0. Message ``s`` goes
to partition ``(base + s) % n`` (``n``: the topic's partitions, ``base``: a
random start per publisher and topic), so one publisher's stream is spread
evenly over the partitions (a group balances it) and any reader can tell
which seqs of a publisher live in the partitions it owns. Each record's key is
the stamp (:data:`SEQ_STRUCT`: a magic, publisher id, seq, ``n``); the value is
exactly the published bytes, so raw Kafka consumers see what was published.
The chunks of a frame split to fit the topic's limit (:mod:`.chunks`) share one
stamp whose magic is :data:`FRAME_MAGIC` instead: only those records need their
headers read, so a subscriber reads nothing but the key of every other record
(and headers stay free for the application, e.g. trace context).
The key, not a header: it costs librdkafka a copy instead of a header list per
message on both sides, and delivery reports carry it, so a record re-sent after
a producer failure keeps its place. (With ``KafkaConfig.ordered`` the key is
the publisher's partition key instead and nothing is stamped.)

The receiving side is :class:`~.order.Sequencer`. Pure Python, no client calls.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

__all__ = ["FRAME_MAGIC", "SEQ_MAGIC", "SEQ_STRUCT", "Stamper", "as_frame", "stamp"]

#: First bytes of a stamped record's key.
SEQ_MAGIC = b"\x00msq"
#: First bytes of the stamp of a split frame's chunks (their headers say which chunk).
FRAME_MAGIC = b"\x00msf"
#: magic, publisher id (8 bytes), sequence number, partitions in the publisher's rotation.
SEQ_STRUCT = struct.Struct(">4s8sQI")

_pack = SEQ_STRUCT.pack


def stamp(publisher: bytes, seq: int, n: int) -> bytes:
    """The key of a publisher's ``seq``-th record on a topic of ``n`` partitions."""
    return _pack(SEQ_MAGIC, publisher, seq, n)


def as_frame(key: bytes) -> bytes:
    """The stamp ``key`` marked as the stamp of a split frame's chunks."""
    return FRAME_MAGIC + key[len(SEQ_MAGIC) :]


class Stamper:
    """One publisher's sequence numbers and partition rotation, per topic.

    Args:
        publisher: the publisher's 8-byte id.
        partitions: ``partitions(topic)``, the topic's partition count (0: unknown).

    Not locked: the caller holds its lock from :meth:`next` to :meth:`taken`.
    """

    def __init__(self, publisher: bytes, partitions: Callable[[str], int]) -> None:
        self.publisher = publisher
        self._count = partitions
        self._rotation: dict[str, tuple[int, int]] = {}  # topic -> (partitions, start)
        self._seqs: dict[str, int] = {}

    def next(self, topic: str) -> tuple[bytes | None, int]:
        """Key and partition of the next record (``(None, -1)``: partitions unknown,
        the record goes unstamped wherever librdkafka puts it)."""
        rotation = self._rotation.get(topic)
        if rotation is None:
            count = self._count(topic)
            if not count:
                return None, -1  # asked again next time
            rotation = self._rotation[topic] = (count, random.randrange(count))
        count, start = rotation
        seq = self._seqs.get(topic, 0)
        return _pack(SEQ_MAGIC, self.publisher, seq, count), (start + seq) % count

    def taken(self, topic: str) -> None:
        """The record of :meth:`next` was handed to the producer."""
        self._seqs[topic] = self._seqs.get(topic, 0) + 1

    def partitions(self, topic: str) -> int:
        """Partitions in the rotation of ``topic`` (0 if none yet)."""
        rotation = self._rotation.get(topic)
        return rotation[0] if rotation else 0

    def forget(self, topic: str) -> None:
        """The topic was re-created: learn its partitions again (seqs go on)."""
        self._rotation.pop(topic, None)
