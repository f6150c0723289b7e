"""A flat-out burst of 1 MiB (or 4 MiB) frames on a default nats-server loses nothing.

One publisher sends 300 frames of 1 MiB (the default ``max_payload``, so plain
NATS messages) as fast as ``publish()`` returns; one subscriber in another
process only collects. nats-server cuts a subscriber whose pending output
passes 64 MB (``max_pending``), so the subscriber must drain its socket about
as fast as the publisher fills it: before, it read through nats-py's 32 KB
``StreamReader`` reads at ~370 MB/s and was cut after ~150-250 frames.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

import pytest

from msight_core.pubsub import NATSPubSub
from msight_core.pubsub.utils import get_nats_config
from msight_core.testing.brokers import NatsServer

COUNT = 300
SIZE = 1024 * 1024


def _collect(env: dict[str, str], topic: str, count: int, ready: Any, out: Any) -> None:
    sub = NATSPubSub(get_nats_config(env=env))
    sub.subscribe(topic)
    ready.set()
    seen: list[int] = []
    while len(seen) < count:
        message = sub.receive(10.0)
        if message is None:
            break
        seen.append(int.from_bytes(message.data[:4], "big"))
    stats = sub.stats()
    out.put((seen, stats["reconnects"], stats["slow_consumer_drops"]))
    sub.close()


def _busy(stop: Any) -> None:
    while not stop.is_set():
        sum(range(10_000))


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "shared-cpu"])
def test_300_frames_of_1_mib_flat_out_all_arrive_in_order(busy: bool) -> None:
    """``shared-cpu``: a third process keeps one core busy meanwhile, as other work
    on a 2-core machine does; the subscriber gets less CPU than the publisher."""
    _burst(busy, COUNT, SIZE)


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "shared-cpu"])
def test_100_large_frames_of_4_mib_flat_out_all_arrive_in_order(busy: bool) -> None:
    """Frames above max_payload go in chunks over core NATS: the pacing keeps the
    subscriber within what the server holds for it, as with plain messages."""
    _burst(busy, 100, 4 * SIZE)


def _burst(busy: bool, count: int, size: int) -> None:
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    hog = ctx.Process(target=_busy, args=(stop,), daemon=True) if busy else None
    with NatsServer() as server:
        env = server.env()
        topic = "t.burst"
        ready, out = ctx.Event(), ctx.Queue()
        child = ctx.Process(target=_collect, args=(env, topic, count, ready, out), daemon=True)
        child.start()
        try:
            assert ready.wait(20), "subscriber did not start"
            if hog is not None:
                hog.start()
            pub = NATSPubSub(get_nats_config(env=env))
            try:
                pub.publish(topic + ".warm", b"x")  # connected before the burst
                pub.flush()
                body = bytes(range(256)) * (size // 256)
                frames = [i.to_bytes(4, "big") + body[4:] for i in range(count)]
                started = time.monotonic()
                for frame in frames:
                    pub.publish(topic, frame)
                pub.flush(30)
                rate = count * size / (time.monotonic() - started) / 1e6
            finally:
                pub.close()
            seen, reconnects, slow = out.get(timeout=40)
        finally:
            stop.set()
            if hog is not None and hog.pid is not None:
                hog.join(5)
            child.join(10)
            if child.is_alive():
                child.kill()
        lost = count - len(seen)
        assert lost == 0 and reconnects == 0, (
            f"{lost} of {count} lost, {reconnects} reconnects (published at {rate:.0f} MB/s); "
            f"server: {server.log_tail(2)}"
        )
        assert seen == list(range(count))
        assert slow == 0
