"""What a node's Prometheus metrics cost: the same node with and without an endpoint.

A processing node (deserialize a 1 KB ``BytesData``, count, return nothing: the
cheapest node there is, so the counting weighs the most) drains ``--count``
messages already queued for it, alternately without metrics and with
``metrics_port=0`` while a thread scrapes ``/metrics`` every ``--scrape``
seconds (Prometheus usually scrapes every 15 s). On the in-process memory
backend by default, so the broker adds no noise; ``--backend redis`` (or nats,
kafka) uses an embedded broker, fed while the node runs.

Two figures per mode, medians over ``--rounds``: messages per second (wall
clock) and CPU microseconds per message (process CPU time, which a busy machine
disturbs less than the wall clock). Overhead = with / without - 1. On a shared
machine both move by a few percent from run to run, so the script also times
what metrics add per message in isolation (``NodeStats.processed()`` with and
without the histograms, in a tight loop) and relates it to the node's CPU per
message: the figure to quote.

Usage::

    python benchmarks/bench_metrics.py                      # memory, 100k x 1 KB
    python benchmarks/bench_metrics.py --backend redis --count 50000
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import urllib.request
import uuid
from typing import Any

from msight_core.config import QueueConfig
from msight_core.data import BytesData
from msight_core.nodes import DataProcessingNode, NodeConfig
from msight_core.pubsub import get_pubsub
from msight_core.pubsub.memory import MemoryBroker, MemoryPubSub


class Counter(DataProcessingNode):
    def process(self, data: Any) -> None:
        return None


def one_run(
    backend: str, env: dict[str, str], count: int, metrics: bool, scrape: float
) -> tuple[float, float]:
    topic = f"bench.metrics.{uuid.uuid4().hex[:8]}"
    config = NodeConfig(
        name="counter",
        subscribe_topic_name=topic,
        register_topics=False,
        stats_interval=0,
        metrics_port=0 if metrics else None,
    )
    payload = BytesData(data=os.urandom(1024), sensor_name="cam").serialize()
    queue = QueueConfig(max_messages=count + 10, max_bytes=4 * 1024**3)
    if backend == "memory":
        broker = MemoryBroker()
        node = Counter(config, MemoryPubSub(broker=broker, queue=queue), env={})
        node.pubsub.subscribe(topic)
        publisher: Any = MemoryPubSub(broker=broker)
        for _ in range(count):  # queued before the clock starts
            publisher.publish(topic, payload)
        feeder = None
    else:
        node = Counter(config, env=env)
        node.pubsub.subscribe(topic)
        publisher = get_pubsub(env=env)

        def feed() -> None:
            for _ in range(count):
                publisher.publish(topic, payload)
            publisher.flush(60)

        feeder = threading.Thread(target=feed, daemon=True)
    stop = threading.Event()

    def scraper() -> None:
        while not stop.wait(scrape):
            url = node.metrics_url
            if url is not None:
                urllib.request.urlopen(url, timeout=5).read()

    scraping = threading.Thread(target=scraper, daemon=True)
    scraping.start()
    if feeder is not None:
        feeder.start()
    cpu, wall = time.process_time(), time.perf_counter()
    node.spin(life_span=count, handle_signals=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    stop.set()
    scraping.join(10)
    if feeder is not None:
        feeder.join(60)
    publisher.close()
    return count / wall, cpu / count * 1e6


def per_message_cost(rounds: int, block: int = 4096) -> tuple[float, float]:
    """CPU microseconds of ``NodeStats.processed()`` without and with the histograms.

    Blocks of ``block`` calls (one fold of the pending values each), alternating
    without/with many times, median per call: a busy machine disturbs short
    interleaved blocks alike.
    """
    from msight_core.metrics import NodeObserver
    from msight_core.nodes import NodeStats

    out: dict[bool, list[float]] = {False: [], True: []}
    stats = {False: NodeStats("without"), True: NodeStats("with")}
    stats[True].observer = NodeObserver()
    for _ in range(rounds * 20):
        for metrics in (False, True):
            processed = stats[metrics].processed
            cpu = time.thread_time()
            for i in range(block):
                processed(0.0001 * (i % 50), 0.002)
            out[metrics].append((time.thread_time() - cpu) / block * 1e6)
    return statistics.median(out[False]), statistics.median(out[True])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="memory", choices=["memory", "redis", "nats", "kafka"])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--scrape", type=float, default=1.0, help="seconds between scrapes")
    args = parser.parse_args(argv)
    server = None
    env: dict[str, str] = {}
    if args.backend != "memory":
        from msight_core.testing.brokers import broker_for

        server = broker_for(args.backend).start()
        env = {**server.env(), "MSIGHT_QUEUE_MAX_MESSAGES": str(args.count + 10)}
    load_before = os.getloadavg()
    runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    try:
        for _ in range(args.rounds):
            for metrics in (False, True):
                runs[metrics].append(one_run(args.backend, env, args.count, metrics, args.scrape))
                rate, cpu = runs[metrics][-1]
                print(f"metrics={metrics!s:5} {rate:9.0f} msg/s {cpu:6.2f} us/msg", file=sys.stderr)
    finally:
        if server is not None:
            server.close()
    without, with_metrics = per_message_cost(args.rounds)
    load_after = os.getloadavg()
    rate = {m: statistics.median(r[0] for r in runs[m]) for m in runs}
    cpu = {m: statistics.median(r[1] for r in runs[m]) for m in runs}
    print(f"\n{args.backend}, {args.count} x 1 KB per run, {args.rounds} rounds, medians")
    print(f"{'':>16} {'msg/s':>10} {'CPU us/msg':>11}")
    print(f"{'no metrics':>16} {rate[False]:>10.0f} {cpu[False]:>11.2f}")
    print(f"{'metrics + scrape':>16} {rate[True]:>10.0f} {cpu[True]:>11.2f}")
    print(
        f"{'overhead':>16} {rate[False] / rate[True] - 1:>+10.1%} {cpu[True] / cpu[False] - 1:>+11.1%}"
    )
    added = with_metrics - without
    print(
        f"per message: NodeStats.processed() {without:.2f} us without, {with_metrics:.2f} us "
        f"with the histograms: +{added:.2f} us = {added / cpu[False]:.2%} of the node's "
        f"{cpu[False]:.1f} us/msg"
    )
    print(
        "load average before: {:.2f} {:.2f} {:.2f}, after: {:.2f} {:.2f} {:.2f}; {} CPUs".format(
            *load_before, *load_after, os.cpu_count() or 0
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
