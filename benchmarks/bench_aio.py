"""The asyncio backends against their synchronous twins, on the same brokers, in one run.

For each broker an embedded server is started; then, alternating sync and async
for ``--rounds`` rounds, a subscriber process (started first, waits until
subscribed) and a publisher process exchange ``--count`` messages of ``--size``
bytes. Sync runs use ``get_pubsub()`` with ``listen()``; async runs use
``get_async_pubsub()`` with ``await publish()`` and ``async for ... in listen()``.
The publisher flushes at the end; the subscriber stops at the last message (or
after 5 s without one).

Three measurements, each the median over the rounds, async / sync:

* ``publish``: a publisher alone, msg/s until everything is flushed;
* ``consume``: the same synchronous publisher, a sync or an async subscriber:
  messages received / seconds from the first publish to the last receive;
* ``end-to-end``: both sync, or both async, measured as ``consume``;
* ``ceiling``: the broker's raw client publishing alone (nats-py, redis-py
  pipelined by 1000, confluent-kafka with ``linger.ms=5``), against the async
  publisher: what the client library itself reaches on this machine.

``lost`` counts what a subscriber missed (Redis disconnects a subscriber that
falls 32 MB behind; core NATS drops for a slow consumer): a run with losses
compares badly. CPU us/msg is the process CPU time per message of the side
that differs (the subscriber in ``consume``, else the publisher), which a busy
machine disturbs less than the rates. The load average is printed with the
table: on a shared machine compare only the two columns of one run.

Usage::

    python benchmarks/bench_aio.py                      # redis, nats, kafka; 1 KB
    python benchmarks/bench_aio.py --brokers nats --count 300000 --rounds 5
    python benchmarks/bench_aio.py --scenarios publish --rounds 9
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

COUNTS = {"redis": 200_000, "nats": 200_000, "kafka": 60_000}
BENCH_ENV = {
    # Keep everything: the comparison is throughput, not the overflow policy.
    "MSIGHT_QUEUE_MAX_MESSAGES": "2000000",
    "MSIGHT_QUEUE_MAX_BYTES": str(4 * 1024**3),
    "MSIGHT_KAFKA_CONSUMER_SESSION_TIMEOUT_MS": "6000",
}
IDLE = 5.0


# -- the two roles (child processes) ------------------------------------------------------


def sub_sync(topic: str, count: int) -> dict[str, Any]:
    from msight_core.pubsub import get_pubsub

    with get_pubsub() as ps:
        ps.subscribe(topic)
        print("ready", flush=True)
        received, first, last = 0, 0.0, 0.0
        cpu = time.process_time()
        while received < count:
            message = ps.receive(IDLE)
            if message is None:
                break
            received += 1
            last = time.time()
            first = first or last
        cpu = time.process_time() - cpu
    return {"received": received, "first": first, "last": last, "cpu": cpu}


async def sub_async(topic: str, count: int) -> dict[str, Any]:
    from msight_core.aio import get_async_pubsub

    async with get_async_pubsub() as ps:
        await ps.subscribe(topic)
        print("ready", flush=True)
        received, first, last = 0, 0.0, 0.0

        async def watchdog() -> None:
            # Nothing for IDLE seconds (messages lost): close, which ends listen().
            seen = -1
            while seen != received:
                seen = received
                await asyncio.sleep(IDLE)
            await ps.close()

        guard = asyncio.ensure_future(watchdog())
        cpu = time.process_time()
        async for _ in ps.listen():
            received += 1
            last = time.time()
            first = first or last
            if received >= count:
                break
        cpu = time.process_time() - cpu
        guard.cancel()
    return {"received": received, "first": first, "last": last, "cpu": cpu}


def pub_sync(topic: str, count: int, size: int) -> dict[str, Any]:
    from msight_core.pubsub import get_pubsub

    payload = os.urandom(size)
    with get_pubsub() as ps:
        ps.publish(topic, b"warm-up")  # connect (and create the topic) before timing
        ps.flush()
        start, cpu = time.time(), time.process_time()
        for _ in range(count):
            ps.publish(topic, payload)
        ps.flush(120)
        end, cpu = time.time(), time.process_time() - cpu
    return {"start": start, "end": end, "cpu": cpu}


async def pub_async(topic: str, count: int, size: int) -> dict[str, Any]:
    from msight_core.aio import get_async_pubsub

    payload = os.urandom(size)
    async with get_async_pubsub() as ps:
        await ps.publish(topic, b"warm-up")
        await ps.flush()
        start, cpu = time.time(), time.process_time()
        for _ in range(count):
            await ps.publish(topic, payload)
        await ps.flush(120)
        end, cpu = time.time(), time.process_time() - cpu
        direct = ps.stats().get("published_direct", 0)  # type: ignore[attr-defined]
    return {"start": start, "end": end, "cpu": cpu, "direct": direct}


def pub_raw(topic: str, count: int, size: int) -> dict[str, Any]:
    """The broker's own client, publishing alone: the ceiling."""
    payload = os.urandom(size)
    backend = os.environ["MSIGHT_PUBSUB_BACKEND"]
    if backend == "nats":
        import nats

        from msight_core.pubsub.utils import get_nats_config

        async def run() -> tuple[float, float, float]:
            nc = await nats.connect(get_nats_config().servers[0])
            await nc.publish(topic, b"warm-up")
            await nc.flush()
            start, cpu = time.time(), time.process_time()
            for _ in range(count):
                await nc.publish(topic, payload)
            await nc.flush(120)
            end, cpu = time.time(), time.process_time() - cpu
            await nc.close()
            return start, end, cpu

        start, end, cpu = asyncio.run(run())
    elif backend == "redis":
        from msight_core.utils import get_redis_client

        client = get_redis_client()
        start, cpu = time.time(), time.process_time()
        for first in range(0, count, 1000):
            pipe = client.pipeline(transaction=False)
            for _ in range(min(1000, count - first)):
                pipe.publish(topic, payload)
            pipe.execute()
        end, cpu = time.time(), time.process_time() - cpu
    else:
        from confluent_kafka import Producer

        from msight_core.pubsub.utils import get_kafka_config

        servers = ",".join(get_kafka_config().servers)
        producer = Producer({"bootstrap.servers": servers, "linger.ms": 5})
        producer.produce(topic, b"warm-up")
        producer.flush(60)
        start, cpu = time.time(), time.process_time()
        for _ in range(count):
            while True:
                try:
                    producer.produce(topic, payload)
                    break
                except BufferError:
                    producer.poll(0.01)
            producer.poll(0)
        producer.flush(120)
        end, cpu = time.time(), time.process_time() - cpu
    return {"start": start, "end": end, "cpu": cpu}


def child(args: argparse.Namespace) -> int:
    count = args.count + 1 if args.role == "sub" else args.count  # + the warm-up message
    if args.role == "sub":
        result = (
            sub_sync(args.topic, count)
            if args.mode == "sync"
            else asyncio.run(sub_async(args.topic, count))
        )
    elif args.mode == "sync":
        result = pub_sync(args.topic, count, args.size)
    elif args.mode == "raw":
        result = pub_raw(args.topic, count, args.size)
    else:
        result = asyncio.run(pub_async(args.topic, count, args.size))
    print(json.dumps(result), flush=True)
    return 0


# -- the driver ----------------------------------------------------------------------------

#: What each measurement runs: (publisher mode, subscriber mode or None) for sync and async.
SCENARIOS = {
    "publish": (("sync", None), ("async", None)),  # publisher alone, until flushed
    "consume": (("sync", "sync"), ("sync", "async")),  # the same sync publisher
    "end-to-end": (("sync", "sync"), ("async", "async")),
    "ceiling": (("raw", None), ("async", None)),  # the raw client, publishing alone
}


def one_run(
    env: dict[str, str], pub_mode: str, sub_mode: str | None, count: int, size: int
) -> dict[str, float]:
    """One exchange; msg/s of the publisher, and of the subscriber if there is one."""
    topic = f"bench.aio.{pub_mode}.{sub_mode}.{uuid.uuid4().hex[:8]}"
    base = [sys.executable, __file__, "--topic", topic, "--count", str(count), "--size", str(size)]
    sub = None
    if sub_mode is not None:
        sub = subprocess.Popen(
            [*base, "--role", "sub", "--mode", sub_mode], env=env, stdout=subprocess.PIPE, text=True
        )
        assert sub.stdout is not None
        if sub.stdout.readline().strip() != "ready":
            sub.kill()
            raise RuntimeError(f"{sub_mode} subscriber did not start")
    pub = subprocess.run(
        [*base, "--role", "pub", "--mode", pub_mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if pub.returncode != 0:
        if sub is not None:
            sub.kill()
        raise RuntimeError(f"{pub_mode} publisher failed: {pub.stderr[-2000:]}")
    sent = json.loads(pub.stdout.strip().splitlines()[-1])
    result = {
        "publish": count / max(sent["end"] - sent["start"], 1e-9),
        "publish_cpu_us": sent["cpu"] / count * 1e6,
    }
    if "direct" in sent:  # async publisher: how many went straight to the backend's buffer
        result["direct"] = sent["direct"]
    if sub is not None:
        out, _ = sub.communicate(timeout=600)
        got = json.loads(out.strip().splitlines()[-1])
        received = got["received"] - 1  # the warm-up message
        result["receive"] = received / max(got["last"] - sent["start"], 1e-9)
        result["receive_cpu_us"] = got["cpu"] / max(received, 1) * 1e6
        result["lost"] = count - received
    return result


def measure(
    broker: str, rounds: int, count: int, size: int, scenarios: list[str]
) -> dict[str, Any]:
    """``{scenario: {"sync": [runs], "async": [runs]}}``, sync and async alternating."""
    from msight_core.testing.brokers import broker_for

    runs: dict[str, Any] = {name: {"sync": [], "async": []} for name in scenarios}
    with broker_for(broker) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MSIGHT_")}
        env.update({**server.env(), **BENCH_ENV})
        for _ in range(rounds):
            for name in scenarios:
                for label, (pub_mode, sub_mode) in zip(("sync", "async"), SCENARIOS[name]):
                    run = one_run(env, pub_mode, sub_mode, count, size)
                    runs[name][label].append(run)
                    print(f"{broker:>6} {name:>10} {label:>5} {run}", file=sys.stderr)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", nargs="+", default=["redis", "nats", "kafka"])
    parser.add_argument("--count", type=int, default=0, help="messages per run (0: per broker)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--json", help="write the raw runs here")
    parser.add_argument("--role", choices=["pub", "sub"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["sync", "async", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        return child(args)
    load_before = os.getloadavg()
    results = {}
    for broker in args.brokers:
        count = args.count or COUNTS.get(broker, 100_000)
        results[broker] = measure(broker, args.rounds, count, args.size, args.scenarios)
    load_after = os.getloadavg()
    print(f"\n{args.size} B messages, {args.rounds} round(s), median msg/s (lost: sum of rounds)")
    print(
        f"{'broker':>8} {'scenario':>11} {'sync/raw':>9} {'async':>9} {'ratio':>6} "
        f"{'CPU us/msg s/a':>15} {'lost s/a':>12}"
    )
    for broker, scenarios in results.items():
        for name, runs in scenarios.items():
            key = "publish" if name in ("publish", "ceiling") else "receive"
            sync = statistics.median(r[key] for r in runs["sync"])
            aio = statistics.median(r[key] for r in runs["async"])
            # CPU per message of the side that differs: the subscriber in "consume",
            # else the publisher (process CPU time: a busy machine disturbs it less).
            side = "receive_cpu_us" if name == "consume" else "publish_cpu_us"
            cpu = "/".join(
                f"{statistics.median(r[side] for r in runs[m]):.1f}" for m in ("sync", "async")
            )
            lost = "-"
            if name not in ("publish", "ceiling"):
                lost = "/".join(
                    str(sum(int(r["lost"]) for r in runs[m])) for m in ("sync", "async")
                )
            print(
                f"{broker:>8} {name:>11} {sync:>9.0f} {aio:>9.0f} {aio / sync:>6.2f} {cpu:>15} "
                f"{lost:>12}"
            )
    print(
        "load average (1/5/15 min) before: {:.2f} {:.2f} {:.2f}, after: {:.2f} {:.2f} {:.2f}; "
        "{} CPUs".format(*load_before, *load_after, os.cpu_count() or 0)
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
