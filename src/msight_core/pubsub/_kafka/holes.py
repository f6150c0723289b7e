"""Offsets a fetch skipped, read again once: :class:`Holes`.

Within a partition Kafka numbers records one after the other, so a fetched
run that does not go on where the partition's last one ended has skipped
something. On Apache Kafka that is rare and meant: a transaction's control
record, records compacted away. On tansu it is a race: with two producers
appending to one partition at once, a fetch can return the later batch while
the earlier one is not visible yet, and the consumer then moves past the
earlier batch for good. Measured on a loaded 2-core machine, two publishers'
bursts of 64 KB frames to two broadcast subscribers: about 1 round in 30 lost
one 15-record batch of one publisher on one partition, for one or both
subscribers, though the broker had acknowledged it.

So a hole seen for the first time is read again: the records after it in the
fetched batch are set aside and the partition is moved back to the hole's
start (``seek``); the next fetch then brings the late batch and what followed,
in order. The same hole seen again (a control record, compaction) is accepted
and counted in :attr:`Holes.skipped`. One extra fetch per hole, never a loop.

A partition's expected offset is forgotten whenever it is (re)positioned
(assigned, revoked, rewound by ``replay``): a jump there is the new position,
not a hole. One thread only (the consumer thread).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from itertools import groupby
from typing import Any

from confluent_kafka import KafkaException, Message, TopicPartition

__all__ = ["Holes"]

logger = logging.getLogger("msight_core.pubsub.kafka")

TP = tuple  # (topic, partition)

_offset, _part, _topic = Message.offset, Message.partition, Message.topic


class Holes:
    """Finds holes in fetched batches and has them read again once.

    Args:
        seek: moves a partition's fetch position (``Consumer.seek``).
    """

    def __init__(self, seek: Callable[[TopicPartition], None]) -> None:
        self.seek = seek
        self.next: dict[TP, int] = {}  # partition -> offset its next record should have
        self.reread: dict[TP, int] = {}  # partition -> the hole last read again
        self.rereads = 0
        """Holes read again (a fetch had skipped records, or a hole was checked)."""
        self.skipped = 0
        """Offsets found missing twice, accepted (control records, compaction)."""

    def forget(self, keys: Iterable[TP]) -> None:
        """Partitions (re)positioned: their next record starts anew."""
        for key in keys:
            self.next.pop(key, None)
            self.reread.pop(key, None)

    def check(self, msgs: list[Any]) -> list[Any]:
        """``msgs`` without the records after a hole seen for the first time
        (their partition was moved back to read them again)."""
        offsets = list(map(_offset, msgs))
        expected = self.next
        cut: set[TP] = set()  # partitions moved back: the rest of the batch's records go
        gone: list[range] = []  # indexes of the records set aside
        start = 0
        for key, run in groupby(zip(map(_topic, msgs), map(_part, msgs))):
            end = start + len(list(run))
            first, last = offsets[start], offsets[end - 1]
            if key[0] is None or first is None or last is None or first < 0:
                start = end  # an error event, not a record
                continue
            if key in cut:
                gone.append(range(start, end))
                start = end
                continue
            hole = at = None
            want = expected.get(key)
            if want is not None and first > want:
                if self.reread.get(key) != want:
                    hole, at = want, start
                else:
                    self.skipped += first - want  # seen again: accepted
            if hole is None and last - first != end - start - 1:
                hole, at = self._inside(key, offsets, start, end)
            if hole is not None and self._read_again(key, hole):
                cut.add(key)
                gone.append(range(at, end))  # type: ignore[arg-type]
                expected[key] = hole
            else:
                if hole is not None:
                    self.skipped += offsets[at] - hole  # type: ignore[index]
                if want is None or last >= want:
                    expected[key] = last + 1
            start = end
        if not gone:
            return msgs
        drop = {i for indexes in gone for i in indexes}
        return [m for i, m in enumerate(msgs) if i not in drop]

    def _inside(
        self, key: TP, offsets: list[Any], start: int, end: int
    ) -> tuple[int | None, int | None]:
        """The first hole within one fetched run not read again yet, and where
        the run goes on after it; holes already read again are counted."""
        done = self.reread.get(key)
        try:
            for i in range(start + 1, end):
                hole = offsets[i - 1] + 1
                if offsets[i] > hole:
                    if hole != done:
                        return hole, i
                    self.skipped += offsets[i] - hole
        except TypeError:  # an error event amid the records: not checked further
            pass
        return None, None

    def _read_again(self, key: TP, hole: int) -> bool:
        try:
            self.seek(TopicPartition(key[0], key[1], hole))
        except KafkaException as exc:  # not fetching (any more): accept the hole
            logger.debug("Kafka: could not read %s[%d] from %d again (%s)", *key, hole, exc)
            return False
        self.reread[key] = hole
        self.rereads += 1
        logger.debug("Kafka: %s[%d] skipped from offset %d: reading it again", *key, hole)
        return True
