"""A bridge NATS -> Kafka against what each side does alone, in one run.

For each size, on embedded brokers (NATS with JetStream; Kafka = tansu):

* ``kafka publish``: a msight ``KafkaPubSub`` (ordered, as a bridge's
  destination is) publishes N messages and flushes: the destination's own rate;
* ``nats drain``: a msight NATS publisher sends N messages flat out and a msight
  NATS subscriber takes them: the source's own rate;
* ``bridge``: the same publisher, a :class:`~msight_core.bridge.Bridge` from
  NATS to Kafka, timed from the first publish until the bridge forwarded all N
  and the Kafka destination confirmed them (``flush()``); losses are counted.

Usage::

    flock /work/bench.lock python benchmarks/bench_bridge.py --sizes 1K,2M --repeat 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Callable

from msight_core.bridge import Bridge, open_backend
from msight_core.cli.common import fmt_bytes, parse_size, render_table
from msight_core.testing.brokers import KafkaServer, NatsServer

MiB = 1024 * 1024


def _topic() -> str:
    return f"bench.{uuid.uuid4().hex[:10]}"


def _stamped(payload: bytes, i: int) -> bytes:
    # Every message distinct, as sensor data is (a bridge takes byte-identical
    # repeats on one topic for echoes of a loop unless loop_window=0).
    return b"%08d" % i + payload[8:]


def kafka_publish(kafka: KafkaServer, payload: bytes, count: int) -> float:
    topic = _topic()
    with open_backend("kafka", kafka.address, env={}, role="destination") as pub:
        pub.publish(topic, payload)  # create the topic, connect
        pub.flush()
        start = time.perf_counter()
        for i in range(count):
            pub.publish(topic, _stamped(payload, i))
        pub.flush(120)
        return time.perf_counter() - start


def nats_drain(nats: NatsServer, payload: bytes, count: int) -> tuple[float, int]:
    topic = _topic()
    with (
        open_backend("nats", nats.url, env={}) as sub,
        open_backend("nats", nats.url, env={}) as pub,
    ):
        sub.subscribe(topic)
        got = 0
        start = time.perf_counter()
        for i in range(count):
            pub.publish(topic, _stamped(payload, i))
        deadline = time.monotonic() + 120
        while got < count and time.monotonic() < deadline:
            if sub.receive(1.0) is not None:
                got += 1
        return time.perf_counter() - start, count - got


def bridged(nats: NatsServer, kafka: KafkaServer, payload: bytes, count: int) -> tuple[float, int]:
    topic = _topic()
    source = open_backend("nats", nats.url, env={})
    destination = open_backend("kafka", kafka.address, env={}, role="destination")
    pub = open_backend("nats", nats.url, env={})
    try:
        destination.publish(topic, b"warm-up")  # topic created, producer connected
        destination.flush()
        bridge = Bridge(source, destination, [topic]).start()
        start = time.perf_counter()
        for i in range(count):
            pub.publish(topic, _stamped(payload, i))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            stats = bridge.stats()
            if stats.forwarded + sum(stats.source.get("dropped", {}).values()) >= count:
                break
            time.sleep(0.002)
        destination.flush(120)
        elapsed = time.perf_counter() - start
        stats = bridge.stats()
        bridge.stop(30)
        return elapsed, count - stats.forwarded
    finally:
        for backend in (pub, source, destination):
            backend.close()


def best(fn: Callable[[], tuple[float, int]], repeat: int) -> tuple[float, int, list[float]]:
    runs = [fn() for _ in range(repeat)]
    times = sorted(t for t, _ in runs)
    return times[0], max(lost for _, lost in runs), times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1K,2M", help="message sizes")
    parser.add_argument("--budget", default="200M", help="bytes per size (at most 50000 msgs)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (best shown)")
    parser.add_argument("--nats-max-payload", default="64M",
                        help="server max_payload (64M: as `msight broker nats`)")  # fmt: skip
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    budget = parse_size(args.budget)
    rows = []
    with NatsServer(jetstream=True, max_payload=parse_size(args.nats_max_payload)) as nats, \
            KafkaServer() as kafka:  # fmt: skip
        for size in sizes:
            count = max(min(budget // size, 50_000), 20)
            payload = os.urandom(size)
            runs: dict[str, Callable[[], tuple[float, int]]] = {
                "kafka publish": lambda p=payload, n=count: (kafka_publish(kafka, p, n), 0),
                "nats drain": lambda p=payload, n=count: nats_drain(nats, p, n),
                "bridge nats->kafka": lambda p=payload, n=count: bridged(nats, kafka, p, n),
            }
            figures = {name: best(run, args.repeat) for name, run in runs.items()}
            for name, (seconds, lost, times) in figures.items():
                spread = "/".join(f"{count / t:.0f}" for t in times)
                rows.append([
                    name, fmt_bytes(size), count, f"{count / seconds:,.0f}",
                    f"{count * size / seconds / MiB:,.1f}", lost, spread,
                ])  # fmt: skip
                print(f"{name} {fmt_bytes(size)} done", file=sys.stderr)
    print(render_table(["path", "size", "msgs", "msg/s", "MB/s", "lost", "msg/s per run"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
