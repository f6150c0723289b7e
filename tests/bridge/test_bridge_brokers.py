"""The bridge between real brokers: exact bytes and order, at-least-once, no loops."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

import pytest
from _bridge_support import KAFKA_TEST

from msight_core.bridge import Bridge
from msight_core.pubsub import PubSubBackend
from msight_core.testing.brokers import NatsServer

MiB = 1024 * 1024
SIZES = (1, 100, 1000, 10_000, 100_000, 300_000)


def payloads(count: int, tag: str, big: int = 3 * MiB) -> list[bytes]:
    """``count`` distinct payloads of mixed sizes, three of them ``big`` (multi-MB frames).

    Each starts with its index and tag so a mix-up is visible; the rest is
    pseudo-random (a hash chain), so equal sizes never mean equal bytes.
    """
    out = []
    for i in range(count):
        size = big if i in (count // 4, count // 2, count - 3) else SIZES[i % len(SIZES)]
        head = f"{tag}:{i}:".encode()
        seed = hashlib.sha256(head).digest()
        body = (seed * (size // 32 + 1))[: max(size - len(head), 0)]
        body = bytes(b ^ (k & 0xFF) for k, b in enumerate(body[:64])) + body[64:]
        out.append(head + body)
    return out


def collect(sub: Any, count: int, timeout: float = 60.0) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        message = sub.receive(0.5)
        if message is not None:
            got.append(message)
    return got


def quiet(sub: Any, seconds: float) -> list[Any]:
    """Whatever arrives within ``seconds`` (expected: nothing)."""
    got = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        message = sub.receive(0.2)
        if message is not None:
            got.append(message)
    return got


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        time.sleep(0.05)


def short(items: list[Any]) -> list[bytes]:
    """The heads of messages or payloads: a readable diff when the order is wrong."""
    return [getattr(m, "data", m)[:24] for m in items]


# -- the three paths of the issue ---------------------------------------------------------


def test_shm_to_nats_exact_bytes_and_order(
    side: Callable[..., PubSubBackend], bridges: Callable[..., Bridge], nats_server: Any,
    shm_domain: str, unique_topic: str,
) -> None:  # fmt: skip
    shm = {"MSIGHT_SHM_DOMAIN": shm_domain}
    sub = side("nats", nats_server.url)
    sub.subscribe(unique_topic)
    bridge = bridges(side("shm", settings=shm), side("nats", nats_server.url, role="destination"),
                     [unique_topic])  # fmt: skip
    producer = side("shm", settings=shm)
    sent = payloads(300, "shm")
    for i, data in enumerate(sent):
        # shm keeps the newest frames for a slow reader: stay within its buffer depth.
        wait_for(lambda i=i: bridge.stats().forwarded >= i - 2)
        producer.publish(unique_topic, data)
    got = collect(sub, len(sent))
    assert short(got) == short(sent)
    assert [m.data for m in got] == sent
    assert {m.topic for m in got} == {unique_topic}
    assert bridge.stats().forwarded == len(sent)


def test_nats_pattern_to_kafka_keeps_bytes_and_order_per_topic(
    side: Callable[..., PubSubBackend], bridges: Callable[..., Bridge], nats_server: Any,
    kafka_server: Any, unique_topic: str,
) -> None:  # fmt: skip
    topics = [f"{unique_topic}.left", f"{unique_topic}.right"]
    sub = side("kafka", kafka_server.address, KAFKA_TEST)
    for topic in topics:
        sub.subscribe(topic)
    bridge = bridges(
        side("nats", nats_server.url), side("kafka", kafka_server.address, role="destination"),
        [f"{unique_topic}.>"],
    )  # fmt: skip
    producer = side("nats", nats_server.url)
    sent = payloads(300, "nk")
    for i, data in enumerate(sent):
        producer.publish(topics[i % 2], data)
    producer.flush()
    got = collect(sub, len(sent), 90)
    assert len(got) == len(sent)
    for k, topic in enumerate(topics):
        assert [m.data for m in got if m.topic == topic] == sent[k::2], topic
    stats = bridge.stats()
    assert stats.forwarded == len(sent)
    assert stats.per_topic == {topics[0]: 150, topics[1]: 150}


def test_kafka_to_redis_with_prefix(
    side: Callable[..., PubSubBackend], bridges: Callable[..., Bridge], kafka_server: Any,
    redis_server: Any, unique_topic: str,
) -> None:  # fmt: skip
    sub = side("redis", redis_server.address)
    sub.subscribe(f"site1.{unique_topic}")
    source = side("kafka", kafka_server.address, KAFKA_TEST, group_id=f"g-{unique_topic}")
    bridge = bridges(source, side("redis", redis_server.address, role="destination"),
                     [unique_topic], prefix="site1.")  # fmt: skip
    producer = side("kafka", kafka_server.address, {"MSIGHT_KAFKA_ORDERED": "true"})
    sent = payloads(300, "kr")
    for data in sent:
        producer.publish(unique_topic, data)
    producer.flush()
    got = collect(sub, len(sent), 90)
    assert short(got) == short(sent)
    assert [m.data for m in got] == sent
    assert {m.topic for m in got} == {f"site1.{unique_topic}"}
    wait_for(lambda: bridge.stats().confirmed == len(sent))


# -- at-least-once --------------------------------------------------------------------------


@pytest.fixture
def site_nats() -> Any:
    """A NATS server of this test alone (JetStream on a store that survives restarts)."""
    with NatsServer(jetstream=True) as server:
        yield server


JS_DEST = {"MSIGHT_NATS_JETSTREAM": "true", "MSIGHT_PUBLISH_TIMEOUT": "2"}


def test_kafka_source_destination_down_then_back_loses_nothing(
    side: Callable[..., PubSubBackend], bridges: Callable[..., Bridge], kafka_server: Any,
    site_nats: Any, unique_topic: str,
) -> None:  # fmt: skip
    check = side("nats", site_nats.url, JS_DEST, group_id="check")
    check.subscribe(unique_topic)
    source = side("kafka", kafka_server.address, KAFKA_TEST, group_id=f"g-{unique_topic}")
    destination = side("nats", site_nats.url, JS_DEST, role="destination")
    bridge = bridges(source, destination, [unique_topic])
    producer = side("kafka", kafka_server.address, {"MSIGHT_KAFKA_ORDERED": "true"})
    first = [b"before-%d" % i for i in range(100)]
    for data in first:
        producer.publish(unique_topic, data)
    producer.flush()
    assert [m.data for m in collect(check, 100)] == first
    wait_for(lambda: bridge.stats().confirmed == 100)

    site_nats.stop()
    second = [b"during-%d" % i for i in range(100)]
    for data in second:
        producer.publish(unique_topic, data)
    producer.flush()
    wait_for(lambda: bridge.stats().outage_retries > 0, 30)
    time.sleep(1.0)
    assert bridge.stats().confirmed == 100  # nothing acknowledged while the site is away
    site_nats.start()

    got = collect(check, 100, 90)
    more = quiet(check, 2.0)  # duplicates are allowed (at-least-once), losses are not
    assert set(second) <= {m.data for m in got + more}
    firsts = list(dict.fromkeys(m.data for m in got + more))
    assert firsts == second  # and they come in order
    wait_for(lambda: bridge.stats().confirmed >= 200, 30)


def test_kafka_source_bridge_stopped_while_site_down_resumes_without_loss(
    side: Callable[..., PubSubBackend], kafka_server: Any, site_nats: Any, unique_topic: str,
) -> None:  # fmt: skip
    check = side("nats", site_nats.url, JS_DEST, group_id="check")
    check.subscribe(unique_topic)
    group = f"g-{unique_topic}"
    producer = side("kafka", kafka_server.address, {"MSIGHT_KAFKA_ORDERED": "true"})

    def run_bridge() -> tuple[Bridge, PubSubBackend, PubSubBackend]:
        src = side("kafka", kafka_server.address, KAFKA_TEST, group_id=group)
        dst = side("nats", site_nats.url, JS_DEST, role="destination")
        return Bridge(src, dst, [unique_topic]).start(), src, dst

    bridge, src, dst = run_bridge()
    first = [b"one-%d" % i for i in range(50)]
    for data in first:
        producer.publish(unique_topic, data)
    producer.flush()
    assert [m.data for m in collect(check, 50)] == first
    wait_for(lambda: bridge.stats().confirmed == 50)

    site_nats.stop()
    second = [b"two-%d" % i for i in range(50)]
    for data in second:
        producer.publish(unique_topic, data)
    producer.flush()
    wait_for(lambda: bridge.stats().forwarded == 100 or bridge.stats().outage_retries > 0, 30)
    bridge.stop(30)  # the destination never confirmed: the source is not acknowledged
    assert bridge.stats().confirmed == 50
    src.close()
    dst.close()  # gives up on what it buffered (the server is away): that is lost here

    site_nats.start()
    bridge, src, dst = run_bridge()  # same group: Kafka delivers the unacknowledged again
    try:
        got = collect(check, 50, 90) + quiet(check, 2.0)
        assert list(dict.fromkeys(m.data for m in got)) == second
    finally:
        bridge.stop(30)


# -- loops --------------------------------------------------------------------------------


@pytest.fixture
def other_nats() -> Any:
    with NatsServer(jetstream=False) as server:
        yield server


def test_two_bridges_pointing_at_each_other_do_not_loop(
    side: Callable[..., PubSubBackend], bridges: Callable[..., Bridge], nats_server: Any,
    other_nats: Any, unique_topic: str,
) -> None:  # fmt: skip
    pattern = f"{unique_topic}.>"
    on_a, on_b = side("nats", nats_server.url), side("nats", other_nats.url)
    on_a.subscribe(pattern)
    on_b.subscribe(pattern)
    a_to_b = bridges(side("nats", nats_server.url),
                     side("nats", other_nats.url, role="destination"), [pattern])  # fmt: skip
    b_to_a = bridges(side("nats", other_nats.url),
                     side("nats", nats_server.url, role="destination"), [pattern])  # fmt: skip
    pub_a, pub_b = side("nats", nats_server.url), side("nats", other_nats.url)
    from_a = [b"from-a-%d" % i for i in range(50)]
    from_b = [b"from-b-%d" % i for i in range(50)]
    for x, y in zip(from_a, from_b):
        pub_a.publish(f"{unique_topic}.a", x)
        pub_b.publish(f"{unique_topic}.b", y)
    pub_a.flush()
    pub_b.flush()
    # Each side: its own 50, the other's 50, and at most one echo of its own (sent
    # back by the other bridge, then dropped by this side's bridge): never more.
    seen_a = [m.data for m in collect(on_a, 100, 30) + quiet(on_a, 3.0)]
    seen_b = [m.data for m in collect(on_b, 100, 30) + quiet(on_b, 3.0)]
    for seen, own, other in ((seen_a, from_a, from_b), (seen_b, from_b, from_a)):
        assert [d for d in seen if d in other] == other  # forwarded once, in order
        assert all(1 <= seen.count(d) <= 2 for d in own)
        assert len(seen) <= 200
    assert a_to_b.stats().echoes_dropped == 50
    assert b_to_a.stats().echoes_dropped == 50
    # The loop stopped: nothing more is forwarded.
    before = (a_to_b.stats().forwarded, b_to_a.stats().forwarded)
    time.sleep(1.0)
    assert (a_to_b.stats().forwarded, b_to_a.stats().forwarded) == before == (100, 100)


def test_shm_and_redis_bridged_both_ways_do_not_loop(
    side: Callable[..., PubSubBackend], bridges: Callable[..., Bridge], redis_server: Any,
    shm_domain: str, unique_topic: str,
) -> None:  # fmt: skip
    shm = {"MSIGHT_SHM_DOMAIN": shm_domain}
    on_redis = side("redis", redis_server.address)
    on_redis.subscribe(unique_topic)
    up = bridges(side("shm", settings=shm), side("redis", redis_server.address,
                 role="destination"), [unique_topic])  # fmt: skip
    down = bridges(side("redis", redis_server.address), side("shm", settings=shm,
                   role="destination"), [unique_topic])  # fmt: skip
    producer = side("shm", settings=shm)
    sent = [b"frame-%d" % i for i in range(40)]
    for i, data in enumerate(sent):
        wait_for(lambda i=i: up.stats().forwarded >= i)
        producer.publish(unique_topic, data)
    seen = [m.data for m in collect(on_redis, 40, 30) + quiet(on_redis, 3.0)]
    assert seen == sent  # each exactly once on Redis: the echo never left the edge box
    assert up.stats().echoes_dropped == 40
    assert down.stats().forwarded == 40


def test_jetstream_source_is_acknowledged_after_the_destination_confirmed(
    side: Callable[..., PubSubBackend], site_nats: Any, redis_server: Any, unique_topic: str,
) -> None:  # fmt: skip
    js = {"MSIGHT_NATS_JETSTREAM": "true"}
    group = f"g-{unique_topic}"
    producer = side("nats", site_nats.url, js)
    check = side("redis", redis_server.address)
    check.subscribe(unique_topic)

    def run_bridge() -> tuple[Bridge, PubSubBackend]:
        src = side("nats", site_nats.url, js, group_id=group)
        dst = side("redis", redis_server.address, role="destination")
        return Bridge(src, dst, [unique_topic]).start(), src

    bridge, src = run_bridge()
    sent = [b"js-%d" % i for i in range(50)]
    for data in sent:
        producer.publish(unique_topic, data)
    producer.flush()
    assert [m.data for m in collect(check, 50)] == sent
    wait_for(lambda: bridge.stats().confirmed == 50)
    bridge.stop(30)
    src.close()  # the durable consumer keeps what was acknowledged

    bridge, src = run_bridge()  # same group: nothing is delivered again
    try:
        producer.publish(unique_topic, b"after")
        producer.flush()
        assert [m.data for m in collect(check, 1, 30) + quiet(check, 1.5)] == [b"after"]
    finally:
        bridge.stop(30)
