"""The bounded receive queue between a backend's reader and listen()."""

from __future__ import annotations

import threading
import time
from collections import deque

import pytest

from msight_core.config import OverflowPolicy, QueueConfig
from msight_core.errors import ClosedError
from msight_core.pubsub._core import Delivery, ReceiveQueue
from msight_core.pubsub.memory import MemoryBroker, MemoryPubSub


def _fill(queue: ReceiveQueue, count: int, size: int = 10) -> None:
    for i in range(count):
        queue.put(Delivery("t", b"%0*d" % (size, i)))


def test_drop_oldest_keeps_the_newest() -> None:
    queue = ReceiveQueue(QueueConfig(max_messages=3, overflow=OverflowPolicy.DROP_OLDEST))
    _fill(queue, 10)
    assert [queue.get(0).data for _ in range(3)] == [b"%010d" % i for i in (7, 8, 9)]
    assert queue.dropped == {"t": 7}


def test_drop_newest_keeps_the_oldest() -> None:
    queue = ReceiveQueue(QueueConfig(max_messages=3, overflow=OverflowPolicy.DROP_NEWEST))
    _fill(queue, 10)
    assert [queue.get(0).data for _ in range(3)] == [b"%010d" % i for i in (0, 1, 2)]
    assert queue.dropped == {"t": 7}


def test_byte_bound() -> None:
    queue = ReceiveQueue(QueueConfig(max_bytes=25))
    _fill(queue, 5, size=10)
    assert len(queue) == 2 and queue.nbytes == 20


@pytest.mark.parametrize(
    ("max_messages", "max_bytes", "sizes", "taken"),
    [
        (10, 100, [10] * 5, 5),  # all of it fits
        (3, 100, [10] * 5, 3),  # the count bound
        (10, 25, [10] * 5, 2),  # the byte bound
        (10, 25, [40, 1, 1], 1),  # one delivery, even above the byte bound
        (10, 100, [], 0),
    ],
)
def test_fitting_takes_what_an_empty_queue_would_hold(
    max_messages: int, max_bytes: int, sizes: list[int], taken: int
) -> None:
    queue = ReceiveQueue(QueueConfig(max_messages=max_messages, max_bytes=max_bytes))
    items = deque(Delivery("t", b"x" * size) for size in sizes)
    before = list(items)
    got = queue.fitting(items)
    assert got == before[:taken] and list(items) == before[taken:]  # order kept, nothing lost
    assert len(queue) == 0 and queue.nbytes == 0  # nothing queued


def test_block_waits_for_the_consumer() -> None:
    queue = ReceiveQueue(QueueConfig(max_messages=2, overflow=OverflowPolicy.BLOCK))
    done = threading.Event()

    def producer() -> None:
        _fill(queue, 6)
        done.set()

    threading.Thread(target=producer, daemon=True).start()
    time.sleep(0.2)
    assert not done.is_set() and len(queue) == 2
    got = [queue.get(2).data for _ in range(6)]
    assert done.wait(2)
    assert got == [b"%010d" % i for i in range(6)]
    assert queue.dropped == {}


def test_close_wakes_get_and_failure_is_raised() -> None:
    queue = ReceiveQueue(QueueConfig())
    threading.Timer(0.1, queue.close).start()
    started = time.monotonic()
    assert queue.get(None) is not None and time.monotonic() - started < 2  # the sentinel
    failing = ReceiveQueue(QueueConfig())
    failing.put(Delivery("t", b"kept"))
    failing.fail(RuntimeError("boom"))
    assert failing.get(0).data == b"kept"
    with pytest.raises(RuntimeError, match="boom"):
        failing.get(0)


def test_stats_count_drops_per_topic_for_the_application() -> None:
    broker = MemoryBroker()
    sub = MemoryPubSub(broker=broker, queue=QueueConfig(max_messages=5))
    sub.subscribe("cam")
    pub = MemoryPubSub(broker=broker)
    for i in range(12):
        pub.publish("cam", b"%d" % i)
    assert sub.stats()["dropped"] == {"cam": 7}
    assert [sub.receive(0).data for _ in range(5)] == [b"%d" % i for i in range(7, 12)]
    sub.close()
    with pytest.raises(ClosedError):
        sub.receive(0)
