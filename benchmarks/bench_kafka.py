"""KafkaPubSub against raw confluent-kafka on the same tansu broker, in one run.

Usage: ``python benchmarks/bench_kafka.py [--count 100000] [--frames 40]
[--only throughput|latency] [--size 2] [--rate 30] [--seconds 10] [--repeat 3]``

Throughput: for 1 KB messages, the produce rate (publish + flush) and the drain
rate (reading a topic that already holds the messages, as a broadcast
subscriber and as a group member), and for 1 MB and 4 MB frames the throughput
(produce, then drain; each run on a fresh broker: see ``throughput()``).
Latency: frames of ``--size`` MB published at ``--rate`` Hz for ``--seconds``,
the subscriber in its own process; latency from a timestamp written into the
frame just before publishing to the subscriber holding it. Raw confluent-kafka
uses the same reliability settings (idempotent, ``acks=all``, ``linger.ms=5``)
and polls delivery reports every 1000 messages, as a careful application would;
its consumer reads with ``consume()`` in one thread.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import multiprocessing
import os
import statistics
import struct
import time
import uuid
from collections.abc import Iterator
from typing import Any

from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from msight_core.pubsub import KafkaPubSub
from msight_core.pubsub.utils import get_kafka_config
from msight_core.testing.brokers import KafkaServer

MiB = 1024 * 1024


def _topic(admin: AdminClient, partitions: int = 6) -> str:
    name = f"bench.{uuid.uuid4().hex[:8]}"
    new = NewTopic(name, partitions, 1, config={"max.message.bytes": str(70 * MiB)})
    admin.create_topics([new])[name].result(10)
    return name


def _raw_producer(address: str) -> Producer:
    return Producer(
        {
            "bootstrap.servers": address,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.max.bytes": 80 * MiB,
            "queue.buffering.max.kbytes": 256 * 1024,
        }
    )


def _raw_consumer(address: str, **extra: Any) -> Consumer:
    return Consumer(
        {
            **extra,
            "bootstrap.servers": address,
            "group.id": uuid.uuid4().hex,
            "enable.auto.commit": False,
            "fetch.max.bytes": 80 * MiB,
            "receive.message.max.bytes": 90 * MiB,
        }
    )


def raw_produce(address: str, topic: str, payload: bytes, count: int) -> float:
    producer = _raw_producer(address)
    started = time.perf_counter()
    for i in range(count):
        while True:
            try:
                producer.produce(topic, payload)
                break
            except BufferError:
                producer.poll(0.01)
        if i % 1000 == 0:
            producer.poll(0)
    producer.flush(120)
    return time.perf_counter() - started


def raw_consume(address: str, topic: str, count: int) -> float:
    consumer = _raw_consumer(address)
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, -2) for p in parts])
    got = 0
    started = time.perf_counter()
    while got < count:
        for msg in consumer.consume(1000, 1.0):
            if msg.error() is None:
                msg.value()
                got += 1
    elapsed = time.perf_counter() - started
    consumer.close()
    return elapsed


def msight_produce(
    env: dict[str, str], topic: str, payload: bytes, count: int, ordered: bool = False
) -> float:
    backend = KafkaPubSub(get_kafka_config(env=env, ordered=ordered))
    backend.publish(topic, payload)  # learn the topic outside the timing
    backend.flush()
    started = time.perf_counter()
    for _ in range(count - 1):
        backend.publish(topic, payload)
    backend.flush(120)
    elapsed = time.perf_counter() - started
    backend.close()
    return elapsed


def msight_consume(env: dict[str, str], topic: str, count: int, group: bool = False) -> float:
    config = get_kafka_config(uuid.uuid4().hex if group else None, env=env, start="earliest")
    backend = KafkaPubSub(config)
    backend.subscribe(topic)  # like assign() for the raw client: not timed
    started = time.perf_counter()
    for got, _ in enumerate(backend.listen(), 1):
        if got >= count:
            break
    elapsed = time.perf_counter() - started
    backend.close()
    return elapsed


# -- latency: paced frames, subscriber in its own process --------------------------------


def _stamp(body: bytearray) -> bytes:
    body[:8] = struct.pack(">d", time.time())
    return bytes(body)


WARMUP = b"warm-up"


def _latency_of(data: bytes) -> float:
    return time.time() - struct.unpack(">d", data[:8])[0]


def _raw_subscriber(
    address: str, topic: str, count: int, ready: Any, out: Any, fetch_wait_ms: int = 500
) -> None:
    consumer = _raw_consumer(address, **{"fetch.wait.max.ms": fetch_wait_ms})
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in parts])
    consumer.consume(1, 1.0)  # positions resolved
    ready.set()
    latencies: list[float] = []
    deadline = time.monotonic() + 120
    while len(latencies) < count and time.monotonic() < deadline:
        for msg in consumer.consume(100, 0.5):
            if msg.error() is None and msg.value() != WARMUP:
                latencies.append(_latency_of(msg.value()))
    consumer.close()
    out.put(latencies)


def _msight_subscriber(env: dict[str, str], topic: str, count: int, ready: Any, out: Any) -> None:
    backend = KafkaPubSub(get_kafka_config(env=env))
    backend.subscribe(topic)
    ready.set()
    latencies: list[float] = []
    deadline = time.monotonic() + 120
    while len(latencies) < count and time.monotonic() < deadline:
        message = backend.receive(0.5)
        if message is not None and message.data != WARMUP:
            latencies.append(_latency_of(message.data))
    out.put((latencies, {k: v for k, v in backend.stats().items() if k.startswith("order")}))
    backend.close()


def _paced(publish: Any, poll: Any, size: int, rate: float, count: int) -> None:
    body = bytearray(os.urandom(size))
    period = 1.0 / rate
    due = time.monotonic()
    for _ in range(count):
        publish(_stamp(body))
        if poll is not None:
            poll()
        due += period
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)


CLIENTS = (
    "raw confluent-kafka",
    "raw, fetch.wait.max.ms=10",  # msight's setting: tansu holds an empty fetch that long
    "KafkaPubSub",
    "KafkaPubSub ordered=true",
)


def latency(
    address: str,
    env: dict[str, str],
    size: int,
    rate: float,
    seconds: float,
    clients: tuple[str, ...] = CLIENTS,
    repeat: int = 1,
) -> list:
    """Rows of (client, p50 ms, p99 ms, max ms, frames received / sent), the
    clients taking turns, ``repeat`` rounds."""
    ctx = multiprocessing.get_context("spawn")
    count = int(rate * seconds)
    admin = AdminClient({"bootstrap.servers": address})
    rows = []
    for label in [c for _ in range(repeat) for c in clients]:
        topic = _topic(admin)
        ready, out = ctx.Event(), ctx.Queue()
        if label.startswith("raw"):
            target: Any = _raw_subscriber
            wait = 10 if "fetch.wait" in label else 500
            args: tuple = (address, topic, count, ready, out, wait)
        else:
            target = _msight_subscriber
            sub_env = {**env, "MSIGHT_KAFKA_ORDERED": "true" if "ordered" in label else "false"}
            args = (sub_env, topic, count, ready, out)
        proc = ctx.Process(target=target, args=args)
        proc.start()
        ready.wait(60)
        time.sleep(1.0)
        if label.startswith("raw"):
            producer = _raw_producer(address)
            producer.produce(topic, WARMUP)  # connected and topic known before timing
            producer.flush(30)
            poll = functools.partial(producer.poll, 0)
            _paced(functools.partial(producer.produce, topic), poll, size, rate, count)
            producer.flush(30)
        else:
            ordered = "ordered" in label
            pub = KafkaPubSub(get_kafka_config(env=env, ordered=ordered))
            pub.publish(topic, WARMUP)  # connected and topic known before timing
            pub.flush(30)
            _paced(functools.partial(pub.publish, topic), None, size, rate, count)
            pub.flush(30)
            pub.close()
        result = out.get(timeout=180)
        proc.join(30)
        lat, extra = (result, {}) if label.startswith("raw") else result
        ms = sorted(x * 1000 for x in lat) or [float("nan")]
        p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
        rows.append((label, statistics.median(ms), p99, ms[-1], f"{len(lat)}/{count}", extra))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--only", choices=("throughput", "latency"), default=None)
    parser.add_argument("--size", type=float, default=2.0, help="latency frame size, MB")
    parser.add_argument("--rate", type=float, default=30.0, help="latency frames per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each drain and latency case")
    parser.add_argument(
        "--clients", default="raw,rawfast,msight,ordered", help="latency: which clients"
    )
    parser.add_argument("--set", action="append", default=[], help="extra MSIGHT_*=value")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.set)

    @contextlib.contextmanager
    def fresh() -> Iterator[tuple[str, dict[str, str]]]:
        """A broker of its own: its address and the backend's settings for it."""
        with KafkaServer() as server:
            yield server.address, _env(server, extra)

    with KafkaServer() as server:
        env = _env(server, extra)
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        if args.only != "latency":
            throughput(server.address, env, args.count, args.frames, args.repeat, fresh)
        if args.only != "throughput":
            size = int(args.size * MiB)
            names = dict(zip(("raw", "rawfast", "msight", "ordered"), CLIENTS, strict=True))
            chosen = tuple(names[c] for c in args.clients.split(","))
            rows = latency(server.address, env, size, args.rate, args.seconds, chosen, args.repeat)
            print(f"\n{args.size:g} MB frames at {args.rate:g} Hz for {args.seconds:g} s "
                  "(subscriber in its own process):")  # fmt: skip
            print(f"{'client':<28}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'received':>11}")
            for label, p50, p99, worst, got, extra in rows:
                print(f"{label:<28}{p50:>9.1f}{p99:>9.1f}{worst:>9.1f}{got:>11}  {extra or ''}")
        print(f"load average after: {os.getloadavg()[0]:.2f}")


def _env(server: KafkaServer, extra: dict[str, str]) -> dict[str, str]:
    return {**server.env(), "MSIGHT_KAFKA_CONSUMER_SESSION_TIMEOUT_MS": "6000", **extra}


def _drain_process(
    kind: str, address: str, env: dict[str, str], topic: str, n: int, out: Any
) -> None:
    if kind == "raw":
        out.put(raw_consume(address, topic, n))
    else:
        out.put(msight_consume(env, topic, n, group=kind == "group"))


def drain(
    address: str, env: dict[str, str], topic: str, n: int, kinds: tuple[str, ...], repeat: int
) -> dict[str, list[float]]:
    """Seconds to read ``n`` messages of ``topic`` from the start, each run in a
    fresh subscriber process (not timed: start-up, subscribe/assign); the
    clients take turns so a change of the machine's load hits them alike."""
    ctx = multiprocessing.get_context("spawn")
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(repeat):
        for kind in kinds:
            out = ctx.Queue()
            proc = ctx.Process(target=_drain_process, args=(kind, address, env, topic, n, out))
            proc.start()
            times[kind].append(out.get(timeout=300))
            proc.join(30)
    return times


def _rates(n: int, seconds: list[float]) -> tuple[float, str]:
    rates = sorted(n / t for t in seconds)
    return rates[-1], f"{rates[-1]:,.0f} msg/s ({rates[0]:,.0f}-{rates[-1]:,.0f})"


def _mb_rates(mb: float, seconds: list[float]) -> tuple[float, str]:
    rates = sorted(mb / t for t in seconds)
    return rates[-1], f"{rates[-1]:,.0f} MB/s ({rates[0]:,.0f}-{rates[-1]:,.0f})"


def throughput(
    address: str, env: dict[str, str], n: int, frames: int, repeat: int, fresh: Any
) -> None:
    rows: list[tuple[str, str, str, str]] = []
    admin = AdminClient({"bootstrap.servers": address})
    payload = os.urandom(1024)
    raw_topic, our_topic = _topic(admin), _topic(admin)
    t_raw = raw_produce(address, raw_topic, payload, n)
    t_our = msight_produce(env, our_topic, payload, n)
    rows.append(("produce 1 KB", f"{n / t_raw:,.0f} msg/s", f"{n / t_our:,.0f} msg/s",
                 f"{t_raw / t_our:.0%}"))  # fmt: skip
    # The raw consumer reads the same topic (the same records, partitions and
    # broker state); it ignores the stamps in the keys.
    times = drain(address, env, our_topic, n, ("raw", "msight", "group"), repeat)
    raw_best, raw_text = _rates(n, times["raw"])
    for kind, label in (("msight", "drain 1 KB"), ("group", "drain 1 KB (group)")):
        best, text = _rates(n, times[kind])
        rows.append((label, raw_text, text, f"{best / raw_best:.0%}"))
    # Published with ordered=true: one partition per publisher, nothing to restore.
    pinned_topic = _topic(admin)
    msight_produce(env, pinned_topic, payload, n, ordered=True)
    times = drain(address, env, pinned_topic, n, ("raw", "msight"), repeat)
    raw_best, raw_text = _rates(n, times["raw"])
    best, text = _rates(n, times["msight"])
    rows.append(("drain 1 KB (ordered=true)", raw_text, text, f"{best / raw_best:.0%}"))
    # Frames: each client on a broker of its own, fresh for every run. tansu's
    # memory storage costs more CPU per byte appended the more it holds (4 rounds
    # of 60 x 4 MB on new topics of one broker: 305, 229, 190, 162 MB/s, its CPU
    # 0.78 -> 1.49 s a round), so on a shared broker whichever client went second
    # paid for the first one's frames.
    for size in (1 * MiB, 4 * MiB):
        frame = os.urandom(size)
        mb = frames * size / MiB
        runs: dict[str, list[tuple[float, float]]] = {"raw": [], "msight": []}
        for _ in range(repeat):
            for kind, timing in runs.items():
                with fresh() as (f_address, f_env):
                    topic = _topic(AdminClient({"bootstrap.servers": f_address}))
                    if kind == "raw":
                        timing.append((raw_produce(f_address, topic, frame, frames),
                                       raw_consume(f_address, topic, frames)))  # fmt: skip
                    else:
                        timing.append((msight_produce(f_env, topic, frame, frames),
                                       msight_consume(f_env, topic, frames)))  # fmt: skip
        label = f"{size // MiB} MB frames"
        for step, name in ((0, "produce"), (1, "drain")):
            raw_best, raw_text = _mb_rates(mb, [t[step] for t in runs["raw"]])
            best, text = _mb_rates(mb, [t[step] for t in runs["msight"]])
            rows.append((f"{name} {label}", raw_text, text, f"{best / raw_best:.0%}"))
    print(f"{'case':<26}{'raw confluent-kafka':>34}{'KafkaPubSub':>34}{'ratio':>8}")
    for case, raw, ours, ratio in rows:
        print(f"{case:<26}{raw:>34}{ours:>34}{ratio:>8}")
    print(
        f"(tansu memory broker on loopback; drains: best of {repeat} (range), each in its own "
        "process, clients taking turns; subscribe()/assign() not timed; frames: best of "
        f"{repeat} (range), each run on a fresh broker)"
    )


if __name__ == "__main__":
    main()
