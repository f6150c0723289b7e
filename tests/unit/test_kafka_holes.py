"""Offsets a fetch skipped are read again once (msight_core.pubsub._kafka.holes)."""

from __future__ import annotations

import pytest

pytest.importorskip("confluent_kafka")

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from msight_core.pubsub._kafka.holes import Holes


def _records(part: int, offsets: range | list[int], topic: str = "t") -> list[Message]:
    return [Message(topic=topic, partition=part, offset=o, value=b"%d" % o) for o in offsets]


def _offsets(msgs: list[Message]) -> list[tuple[int, int]]:
    return [(m.partition(), m.offset()) for m in msgs]


class _Consumer:
    def __init__(self, fail: bool = False) -> None:
        self.seeks: list[tuple[str, int, int]] = []
        self.fail = fail

    def seek(self, tp: TopicPartition) -> None:
        if self.fail:
            raise KafkaException(KafkaError(KafkaError._STATE))
        self.seeks.append((tp.topic, tp.partition, tp.offset))


def test_contiguous_batches_pass_untouched() -> None:
    consumer = _Consumer()
    holes = Holes(consumer.seek)
    first = _records(0, range(10)) + _records(1, range(5, 9))
    assert holes.check(first) is first
    second = _records(1, range(9, 12)) + _records(0, range(10, 20))
    assert holes.check(second) is second
    assert consumer.seeks == [] and holes.rereads == 0


def test_a_batch_that_skipped_records_is_read_again_from_the_hole() -> None:
    # tansu: a fetch at 30 returned 45..59 while 30..44 was not visible yet.
    consumer = _Consumer()
    holes = Holes(consumer.seek)
    holes.check(_records(1, range(15, 30)))
    batch = _records(0, range(5)) + _records(1, range(45, 60)) + _records(2, range(7, 9))
    batch += _records(1, range(60, 62))  # the same partition again later in the batch
    kept = holes.check(batch)
    assert _offsets(kept) == [(0, o) for o in range(5)] + [(2, 7), (2, 8)]
    assert consumer.seeks == [("t", 1, 30)]
    # The next fetch brings the late batch and what followed, in order.
    again = _records(1, range(30, 62))
    assert holes.check(again) is again
    assert holes.rereads == 1 and holes.skipped == 0


def test_a_hole_inside_one_fetched_run_keeps_what_came_before_it() -> None:
    consumer = _Consumer()
    holes = Holes(consumer.seek)
    kept = holes.check(_records(3, [*range(10), *range(25, 31)], topic="u"))
    assert _offsets(kept) == [(3, o) for o in range(10)]
    assert consumer.seeks == [("u", 3, 10)]


def test_the_same_hole_twice_is_accepted_once_counted() -> None:
    # A transaction's control record (or compaction): the second read shows it again.
    consumer = _Consumer()
    holes = Holes(consumer.seek)
    holes.check(_records(0, range(10)))
    assert holes.check(_records(0, range(11, 20))) == []
    again = _records(0, range(11, 20))
    assert holes.check(again) is again
    assert consumer.seeks == [("t", 0, 10)]
    assert holes.rereads == 1 and holes.skipped == 1
    # Past it, a new hole is read again.
    assert holes.check(_records(0, range(25, 30))) == []
    assert consumer.seeks[-1] == ("t", 0, 20)


def test_a_repositioned_partition_starts_anew() -> None:
    consumer = _Consumer()
    holes = Holes(consumer.seek)
    holes.check(_records(0, range(10)))
    holes.forget([("t", 0)])  # replay("latest"), a rebalance
    batch = _records(0, range(500, 510))
    assert holes.check(batch) is batch
    assert consumer.seeks == []


def test_a_partition_that_cannot_be_moved_keeps_its_records() -> None:
    holes = Holes(_Consumer(fail=True).seek)
    holes.check(_records(0, range(10)))
    batch = _records(0, range(20, 30))
    assert holes.check(batch) is batch
    assert holes.skipped == 10 and holes.rereads == 0


def test_error_events_in_a_batch_are_not_holes() -> None:
    consumer = _Consumer()
    holes = Holes(consumer.seek)
    holes.check(_records(0, range(3)))
    error = Message(topic=None, partition=-1, offset=-1001, error=KafkaError(KafkaError._TRANSPORT))
    batch = [error, *_records(0, range(3, 6))]
    assert holes.check(batch) is batch
    assert consumer.seeks == []


@pytest.mark.parametrize("fetch", [3, 7, 100])
def test_a_log_with_control_records_is_read_whole_each_hole_read_again_once(fetch: int) -> None:
    # Offsets 5 and 11 are transaction markers: never handed to the consumer.
    log = [o for o in range(17) if o not in (5, 11)]
    position, delivered = 0, []

    def seek(tp: TopicPartition) -> None:
        nonlocal position
        position = tp.offset

    holes = Holes(seek)
    for _ in range(50):
        batch = _records(0, [o for o in log if o >= position][:fetch])
        if not batch:
            break
        position = batch[-1].offset() + 1
        delivered += [m.offset() for m in holes.check(batch)]
    assert delivered == log
    assert holes.rereads == 2 and holes.skipped == 2
