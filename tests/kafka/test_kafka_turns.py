"""Who fetches (``pubsub/_turns.py``): ``listen()``'s own thread while the
application keeps coming back for more, the reader thread while it is busy
elsewhere; a failure on either thread is raised by ``listen()``."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from msight_core.errors import BrokerError
from msight_core.pubsub import KafkaPubSub


def _topic() -> str:
    return f"turns.{uuid.uuid4().hex[:8]}"


def _watch(backend: KafkaPubSub) -> list[tuple[bool, int]]:
    """Record, for each fetched batch, whether the main thread handled it and its size."""
    subscriber = backend._subscriber
    assert subscriber is not None
    seen: list[tuple[bool, int]] = []
    handle = subscriber._handle

    def watched(msgs: list[Any]) -> None:
        seen.append((threading.current_thread() is threading.main_thread(), len(msgs)))
        handle(msgs)

    subscriber._handle = watched  # type: ignore[method-assign]
    return seen


def _watch_queue(backend: KafkaPubSub) -> list[int]:
    """Record how many deliveries the main thread put into the receive queue, per offer."""
    queue = backend._queue
    offer = queue.offer
    sizes: list[int] = []

    def watched(items: Any) -> None:
        if items and threading.current_thread() is threading.main_thread():
            sizes.append(len(items))
        offer(items)

    queue.offer = watched  # type: ignore[method-assign]
    return sizes


def _publish_in_bursts(pub: KafkaPubSub, topic: str, count: int, burst: int) -> threading.Thread:
    def run() -> None:
        for start in range(0, count, burst):
            for i in range(start, min(count, start + burst)):
                pub.publish(topic, b"%d" % i)
            pub.flush(10)
            time.sleep(0.02)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _after_one_message(
    backends: Callable[..., KafkaPubSub], topic: str
) -> tuple[KafkaPubSub, KafkaPubSub]:
    """A publisher and a subscriber of ``topic`` that has received one message."""
    pub, sub = backends(), backends()
    sub.subscribe(topic)
    pub.publish(topic, b"0")
    pub.flush(10)
    first = sub.receive(timeout=15)
    assert first is not None and first.data == b"0"
    return pub, sub


def test_a_live_stream_is_fetched_on_the_listening_thread(
    backends: Callable[..., KafkaPubSub],
) -> None:
    topic = _topic()
    pub, sub = backends(), backends()
    sub.subscribe(topic)
    seen = _watch(sub)
    queued_here = _watch_queue(sub)
    count = 4000
    thread = _publish_in_bursts(pub, topic, count, 200)
    got = []
    for data in sub.listen():
        got.append(int(data))
        if len(got) == count:
            break
    thread.join(30)
    assert got == list(range(count))
    here = sum(n for main, n in seen if main)
    # The reader thread may fetch until listen() first comes; after that it stands aside.
    assert here >= count // 2, seen
    # What listen()'s thread fetched went straight to it, not through the queue.
    assert queued_here == [], queued_here


def test_the_reader_thread_fetches_while_the_application_is_busy(
    backends: Callable[..., KafkaPubSub],
) -> None:
    topic = _topic()
    pub, sub = _after_one_message(backends, topic)
    seen = _watch(sub)
    for i in range(1, 501):  # meanwhile the application is busy: no listen()
        pub.publish(topic, b"%d" % i)
    pub.flush(10)
    deadline = time.monotonic() + 15
    while len(sub._queue) < 500 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(sub._queue) == 500  # fetched ahead, without the application
    assert seen and not any(main for main, _ in seen)
    rest = [sub.receive(timeout=5) for _ in range(500)]
    assert [int(m.data) for m in rest if m is not None] == list(range(1, 501))


def test_a_subscribe_from_the_listening_thread_is_served_after_it_had_the_turn(
    backends: Callable[..., KafkaPubSub],
) -> None:
    first, second = _topic(), _topic()
    pub, sub = _after_one_message(backends, first)
    assert sub.receive(timeout=0.2) is None  # listen()'s thread had the turn just now
    started = time.monotonic()
    sub.subscribe(second)  # run by the reader thread, which takes the turn back at once
    assert time.monotonic() - started < 5
    pub.publish(second, b"b")
    pub.flush(10)
    message = sub.receive(timeout=15)
    assert message is not None and (message.topic, message.data) == (second, b"b")


def test_a_failure_while_listen_fetches_is_raised_and_stops_the_reader(
    backends: Callable[..., KafkaPubSub],
) -> None:
    topic = _topic()
    pub, sub = _after_one_message(backends, topic)
    subscriber = sub._subscriber
    assert subscriber is not None
    handle = subscriber._handle

    def failing(msgs: list[Any]) -> None:
        if threading.current_thread() is threading.main_thread():
            raise RuntimeError("inbox broke")
        handle(msgs)

    subscriber._handle = failing  # type: ignore[method-assign]
    # A live stream while the application keeps listening: listen()'s thread fetches.
    thread = _publish_in_bursts(pub, topic, 2000, 20)
    with pytest.raises(BrokerError, match="inbox broke"):
        for _ in range(2000):
            sub.receive(timeout=5)
    subscriber._thread.join(10)
    assert not subscriber._thread.is_alive()  # stopped; the consumer was closed
    thread.join(60)


def test_a_close_while_listen_fetches_hands_out_nothing_more(
    backends: Callable[..., KafkaPubSub],
) -> None:
    topic = _topic()
    pub, sub = _after_one_message(backends, topic)
    subscriber = sub._subscriber
    assert subscriber is not None
    handle = subscriber._handle
    closer: list[threading.Thread] = []
    fetched_while_closing: set[bytes] = set()

    def closing(msgs: list[Any]) -> None:
        handle(msgs)
        if msgs and threading.current_thread() is threading.main_thread() and not closer:
            # Another thread closes the backend while listen()'s thread holds this batch.
            fetched_while_closing.update(m.value() for m in msgs)
            closer.append(threading.Thread(target=sub.close, daemon=True))
            closer[0].start()
            deadline = time.monotonic() + 5
            while not sub.closed and time.monotonic() < deadline:
                time.sleep(0.001)

    subscriber._handle = closing  # type: ignore[method-assign]
    thread = _publish_in_bursts(pub, topic, 2000, 50)
    # Ends at close(). What the reader thread queued before may come first; the
    # batch fetched while the backend was closing never does.
    got = list(sub.listen())
    assert closer and sub.closed and fetched_while_closing
    assert not fetched_while_closing.intersection(got), sorted(fetched_while_closing)[:3]
    closer[0].join(15)
    thread.join(60)
