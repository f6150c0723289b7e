"""Who takes shm samples in bytes mode (``pubsub/_turns.py``): ``listen()``'s own
thread while the application waits for a message (no hand-over between threads
on the way to it), the reader thread whenever the application is busy (the few
samples a subscriber's buffer holds are never overwritten meanwhile)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from msight_core.pubsub.shm import ShmPubSub

FRAME = 1024 * 1024  # a sample of its own (small messages travel batched)


def _topic() -> str:
    return f"turns.{uuid.uuid4().hex[:8]}"


def _watch(backend: ShmPubSub) -> list[bool]:
    """Record, for each sample decoded, whether the main thread decoded it."""
    decoder = backend._decoder
    messages = decoder.messages
    seen: list[bool] = []

    def watched(*args: Any, **kwargs: Any) -> Any:
        seen.append(threading.current_thread() is threading.main_thread())
        return messages(*args, **kwargs)

    decoder.messages = watched  # type: ignore[method-assign]
    return seen


def _frame(i: int) -> bytes:
    return i.to_bytes(4, "big", signed=True) * (FRAME // 4)


def _index(data: bytes | None) -> int | None:
    """Which ``_frame`` this is (``None``: nothing came); checks the whole frame."""
    if data is None:
        return None
    i = int.from_bytes(data[:4], "big", signed=True)
    assert data == _frame(i)
    return i


def _subscribed(make: Callable[..., ShmPubSub]) -> tuple[ShmPubSub, ShmPubSub, str]:
    """A subscriber and a publisher of a new topic, its frames' memory reserved."""
    topic = _topic()
    sub, pub = make(), make()
    sub.subscribe(topic)
    pub.reserve(topic, FRAME)
    return sub, pub, topic


def _publish(pub: ShmPubSub, topic: str, count: int, gap: float, delay: float) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        for i in range(count):
            pub.publish(topic, _frame(i))
            time.sleep(gap)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_frame_waited_for_is_copied_on_the_listening_thread(
    make: Callable[..., ShmPubSub],
) -> None:
    sub, pub, topic = _subscribed(make)
    seen = _watch(sub)
    sender = _publish(pub, topic, 10, gap=0.03, delay=0.3)  # listen() waits first
    got = []
    for data in sub.listen():
        got.append(data)
        if len(got) == 10:
            break
    sender.join(5)
    assert [_index(d) for d in got] == list(range(10))
    # The application came back for each frame long before the next one: the
    # reader thread never had to take one (allow one for a machine that stalls).
    assert sum(seen) >= 9, seen


def test_the_reader_takes_samples_while_the_application_is_busy(
    make: Callable[..., ShmPubSub],
) -> None:
    sub, pub, topic = _subscribed(make)
    depth = sub.config.buffer_depth
    count = 5 * depth
    pub.publish(topic, _frame(-1))
    first = sub.receive(timeout=5)  # listen() has taken a turn
    assert first is not None and _index(first.data) == -1
    seen = _watch(sub)
    # The application is away for all of these, far more than the subscriber's
    # buffer holds: they wait in the receive queue, none overwritten.
    _publish(pub, topic, count, gap=0.005, delay=0.0).join(10)
    time.sleep(0.2)
    got = [sub.receive(timeout=5) for _ in range(count)]
    assert [_index(d.data if d is not None else None) for d in got] == list(range(count))
    assert sub.stats()["dropped"] == {}
    assert seen.count(False) >= count - 1, seen  # taken by the reader thread


def test_close_ends_a_listen_that_waits_on_its_own_thread(
    make: Callable[..., ShmPubSub],
) -> None:
    topic = _topic()
    sub, pub = make(), make()
    sub.subscribe(topic)
    got: list[bytes] = []
    ended = threading.Event()

    def listen() -> None:
        got.extend(sub.listen())  # until close()
        ended.set()

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    pub.publish(topic, _frame(1))
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # listen() waits in the inbox, holding the turn
    started = time.monotonic()
    sub.close()
    assert ended.wait(5), "listen() did not end after close()"
    assert time.monotonic() - started < 2.0
    assert [_index(d) for d in got] == [1]
