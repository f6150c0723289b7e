"""What the Kafka backend relies on in the shared template, without a broker.

``QueueBackend._accept`` lets a backend skip deliveries that went stale while
queued (Kafka: their partition was revoked or rewound); ``ReceiveQueue.offer``
moves what fits and never waits or drops (Kafka pauses its partitions instead).
"""

from __future__ import annotations

from collections import deque

from msight_core.config import QueueConfig
from msight_core.pubsub._core import Delivery, QueueBackend, ReceiveQueue


class _Stale(QueueBackend):
    """A backend whose deliveries with token ``"stale"`` went stale."""

    def __init__(self) -> None:
        super().__init__(QueueConfig())
        self.asked: list[object] = []
        self.acked: list[object] = []

    def _subscribe(self, name: str) -> None:
        pass

    def _publish(self, name: str, data: bytes) -> None:
        self._queue.put(Delivery(name, data, None))

    def _ack(self, delivery: Delivery) -> None:
        self.acked.append(delivery.token)

    def _accept(self, delivery: Delivery) -> bool:
        self.asked.append(delivery.token)
        return delivery.token != "stale"

    def _close(self) -> None:
        pass


def test_stale_deliveries_are_skipped_uncounted_and_unacknowledged() -> None:
    backend = _Stale()
    backend.subscribe("t")
    tokens = ["a", "stale", "stale", None, "b", "stale"]
    backend._queue.put_many([Delivery("t", b"%d" % i, tok) for i, tok in enumerate(tokens)])
    got = [backend.receive(0.01) for _ in range(3)]
    assert [m.data for m in got if m is not None] == [b"0", b"3", b"4"]
    assert backend.receive(0.01) is None  # only a stale one was left
    assert backend.delivered == 3
    assert backend.asked == ["a", "stale", "stale", "b", "stale"]  # never for token None
    assert backend.acked == ["a", "b"]
    backend.close()


def test_a_backend_without_the_hook_is_not_asked() -> None:
    class Plain(_Stale):
        _accept = QueueBackend._accept  # not overridden

    backend = Plain()
    backend.subscribe("t")
    backend._queue.put(Delivery("t", b"x", "stale"))
    assert backend.receive(0.01) is not None
    backend.close()


def test_offer_moves_what_fits_and_keeps_the_rest() -> None:
    queue = ReceiveQueue(QueueConfig(max_messages=3, max_bytes=1000))
    items = deque(Delivery("t", b"x" * 10) for _ in range(5))
    queue.offer(items)
    assert len(queue) == 3 and len(items) == 2 and queue.nbytes == 30
    queue.get_many(0)
    queue.offer(items)
    assert len(queue) == 2 and not items and queue.dropped == {}


def test_offer_respects_the_byte_bound_but_takes_one_big_frame_into_an_empty_queue() -> None:
    queue = ReceiveQueue(QueueConfig(max_messages=100, max_bytes=25))
    items = deque(Delivery("t", b"x" * 10) for _ in range(3))
    queue.offer(items)
    assert len(queue) == 2 and len(items) == 1
    big = deque([Delivery("t", b"x" * 100)])
    queue.offer(big)
    assert len(big) == 1  # the queue is not empty: it waits
    queue.get_many(0)
    queue.offer(big)
    assert not big and queue.nbytes == 100


def test_offer_after_close_empties_the_leftovers() -> None:
    queue = ReceiveQueue(QueueConfig())
    queue.close()
    items = deque([Delivery("t", b"x")])
    queue.offer(items)
    assert not items and len(queue) == 0
