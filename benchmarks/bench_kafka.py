"""KafkaPubSub against raw confluent-kafka on the same tansu broker, in one run.

Usage: ``python benchmarks/bench_kafka.py [--count 100000] [--frames 40]``

Measures, for 1 KB messages, the produce rate (publish + flush) and the consume
rate (reading a topic that already holds the messages), and for 1 MB and 4 MB
frames the end-to-end throughput. Raw confluent-kafka uses the same reliability
settings (idempotent, ``acks=all``) and polls delivery reports every 1000
messages, as a careful application would.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition
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


def raw_produce(address: str, topic: str, payload: bytes, count: int) -> float:
    producer = Producer(
        {
            "bootstrap.servers": address,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.max.bytes": 80 * MiB,
            "queue.buffering.max.kbytes": 256 * 1024,
        }
    )
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
    consumer = Consumer(
        {
            "bootstrap.servers": address,
            "group.id": uuid.uuid4().hex,
            "enable.auto.commit": False,
            "fetch.max.bytes": 80 * MiB,
            "receive.message.max.bytes": 90 * MiB,
        }
    )
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


def msight_produce(env: dict[str, str], topic: str, payload: bytes, count: int) -> float:
    backend = KafkaPubSub(get_kafka_config(env=env))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--frames", type=int, default=40)
    args = parser.parse_args()
    rows: list[tuple[str, str, str, str]] = []
    with KafkaServer() as server:
        address = server.address
        env = {**server.env(), "MSIGHT_KAFKA_CONSUMER_SESSION_TIMEOUT_MS": "6000"}
        admin = AdminClient({"bootstrap.servers": address})
        payload = os.urandom(1024)
        n = args.count
        raw_topic, our_topic = _topic(admin), _topic(admin)
        t_raw = raw_produce(address, raw_topic, payload, n)
        t_our = msight_produce(env, our_topic, payload, n)
        rows.append(("produce 1 KB", f"{n / t_raw:,.0f} msg/s", f"{n / t_our:,.0f} msg/s",
                     f"{t_raw / t_our:.0%}"))  # fmt: skip
        c_raw = raw_consume(address, raw_topic, n)
        c_our = msight_consume(env, our_topic, n)
        rows.append(("consume 1 KB", f"{n / c_raw:,.0f} msg/s", f"{n / c_our:,.0f} msg/s",
                     f"{c_raw / c_our:.0%}"))  # fmt: skip
        for size in (1 * MiB, 4 * MiB):
            frame = os.urandom(size)
            count = args.frames
            raw_t, our_t = _topic(admin), _topic(admin)
            p_raw = raw_produce(address, raw_t, frame, count)
            p_our = msight_produce(env, our_t, frame, count)
            r_raw = raw_consume(address, raw_t, count)
            r_our = msight_consume(env, our_t, count)
            mb = count * size / MiB
            label = f"{size // MiB} MB frames"
            rows.append((f"produce {label}", f"{mb / p_raw:,.0f} MB/s", f"{mb / p_our:,.0f} MB/s",
                         f"{p_raw / p_our:.0%}"))  # fmt: skip
            rows.append((f"consume {label}", f"{mb / r_raw:,.0f} MB/s", f"{mb / r_our:,.0f} MB/s",
                         f"{r_raw / r_our:.0%}"))  # fmt: skip
    print(f"{'case':<22}{'raw confluent-kafka':>22}{'KafkaPubSub':>18}{'ratio':>8}")
    for case, raw, ours, ratio in rows:
        print(f"{case:<22}{raw:>22}{ours:>18}{ratio:>8}")
    print("(tansu memory broker on loopback; subscribe()/assign() not timed)")


if __name__ == "__main__":
    main()
