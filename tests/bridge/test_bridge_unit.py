"""The bridge without brokers: configuration, naming, loops, acknowledgement order."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import pytest

from msight_core.bridge import Bridge, _Echoes, bridge_name, side_env
from msight_core.errors import BackpressureError, ConfigError, InvalidTopicError
from msight_core.pubsub.base import Capabilities
from msight_core.pubsub.memory import MemoryBroker, MemoryPubSub
from msight_core.topics import Topic


@pytest.fixture
def made() -> Iterator[list[Any]]:
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        if isinstance(thing, Bridge):
            thing.stop(10)
        else:
            thing.close()


def _memory(made: list[Any], broker: MemoryBroker, **kwargs: Any) -> MemoryPubSub:
    backend = MemoryPubSub(broker=broker, **kwargs)
    made.append(backend)
    return backend


def _collect(sub: Any, count: int, timeout: float = 10.0) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        message = sub.receive(0.1)
        if message is not None:
            got.append(message)
    return got


# -- configuration -------------------------------------------------------------------------


def test_side_env_sets_one_side_only_and_keeps_other_variables() -> None:
    base = {"MSIGHT_PUBLISH_TIMEOUT": "3", "MSIGHT_NATS_SERVERS": "nats://old:4222"}
    env = side_env("nats", "nats://a:4222, nats://b:4222", {"MSIGHT_NATS_JETSTREAM": "true"}, base)
    assert env["MSIGHT_PUBSUB_BACKEND"] == "nats"
    assert env["MSIGHT_NATS_SERVERS"] == "nats://a:4222,nats://b:4222"
    assert env["MSIGHT_NATS_JETSTREAM"] == "true"
    assert env["MSIGHT_PUBLISH_TIMEOUT"] == "3"
    assert base["MSIGHT_NATS_SERVERS"] == "nats://old:4222"  # not modified
    assert side_env("kafka", "k1:9092", env={})["MSIGHT_KAFKA_SERVERS"] == "k1:9092"
    redis = side_env("redis", "redis://user:secret@cache:6380/0", env={})
    assert (
        redis["MSIGHT_REDIS_MESSAGE_BROKER_HOST"],
        redis["MSIGHT_REDIS_MESSAGE_BROKER_PORT"],
    ) == (
        "cache",
        "6380",
    )
    assert side_env("redis", "cache", env={})["MSIGHT_REDIS_MESSAGE_BROKER_PORT"] == "6379"


@pytest.mark.parametrize(
    ("backend", "url", "settings", "needle"),
    [
        ("rabbit", None, None, "unknown backend"),
        ("shm", "x:1", None, "no server address"),
        ("redis", "cache:notaport", None, "not a Redis address"),
        ("redis", "a:1,b:2", None, "one address"),
        ("nats", " , ", None, "empty server address"),
        ("nats", None, {"PATH": "/bin"}, "not an MSIGHT_"),
        ("nats", None, {"MSIGHT_PUBSUB_BACKEND": "kafka"}, "backend argument"),
    ],
)
def test_side_env_refuses_bad_input(backend: str, url: Any, settings: Any, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        side_env(backend, url, settings, env={})


def test_bridge_name_is_stable_and_depends_on_the_configuration() -> None:
    assert bridge_name("nats", "a", ["t"]) == bridge_name("nats", "a", ["t"])
    assert bridge_name("nats", "a", ["t"]) != bridge_name("nats", "b", ["t"])
    assert bridge_name("x").startswith("msight-bridge-")


def test_bad_configurations_are_typed_errors(made: list[Any]) -> None:
    a, b = MemoryBroker(), MemoryBroker()
    src, dst = _memory(made, a), _memory(made, b)
    with pytest.raises(ConfigError, match="two backends"):
        Bridge(src, src, ["t"])
    with pytest.raises(ConfigError, match="at least one"):
        Bridge(src, dst, [])
    with pytest.raises(InvalidTopicError):
        Bridge(src, dst, ["bad topic"])
    with pytest.raises(InvalidTopicError):
        Bridge(src, dst, [">"])
    with pytest.raises(InvalidTopicError):
        Bridge(src, dst, ["t"], prefix="bad prefix ")
    with pytest.raises(InvalidTopicError):
        Bridge(src, dst, ["t"], remap={"t": "_msight.x"})
    with pytest.raises(ConfigError):
        Bridge(src, dst, ["t"], batch_messages=0)
    with pytest.raises(TypeError):
        Bridge(src, dst, [42])  # type: ignore[list-item]

    class NoPatterns(MemoryPubSub):
        capabilities = Capabilities(patterns=False)

    plain = NoPatterns(broker=a)
    made.append(plain)
    with pytest.raises(InvalidTopicError, match="does not support wildcard"):
        Bridge(plain, dst, ["camera1.>"])


def test_same_server_refuses_names_that_come_straight_back(made: list[Any]) -> None:
    broker = MemoryBroker()
    src, dst = _memory(made, broker), _memory(made, broker)
    with pytest.raises(ConfigError, match="straight back"):
        Bridge(src, dst, ["cam.frames"])
    with pytest.raises(ConfigError, match="a loop"):
        Bridge(src, dst, ["cam.frames", "site.cam.frames"], prefix="site.")
    # Renamed out of what it reads: runs; a pattern match found at run time is dropped.
    bridge = Bridge(src, dst, ["cam.*"], prefix="cam.", remap={"cam.a": "y"})
    made.append(bridge.start())
    sub = _memory(made, broker)
    sub.subscribe("cam.cam.c")
    pub = _memory(made, broker)
    pub.publish("cam.a", b"would come back as cam.y")
    pub.publish("cam.c", b"forwarded as cam.cam.c")
    assert [m.data for m in _collect(sub, 1)] == [b"forwarded as cam.cam.c"]
    time.sleep(0.3)
    stats = bridge.stats()
    assert (stats.forwarded, stats.loop_dropped) == (1, 1)


def test_prefix_and_remap_name_the_destination(made: list[Any]) -> None:
    a, b = MemoryBroker(), MemoryBroker()
    sub = _memory(made, b)
    sub.subscribe("site.renamed")
    sub.subscribe("site.cam.b")
    bridge = Bridge(_memory(made, a), _memory(made, b), ["cam.b", Topic("cam.a")],
                    prefix="site.", remap={"cam.a": "renamed"})  # fmt: skip
    assert bridge.topics == ("cam.b", "cam.a")
    made.append(bridge.start())
    pub = _memory(made, a)
    pub.publish("cam.a", b"A")
    pub.publish("cam.b", b"B")
    got = _collect(sub, 2)
    assert [(m.topic, m.data) for m in got] == [("site.renamed", b"A"), ("site.cam.b", b"B")]
    assert bridge.stats().per_topic == {"cam.a": 1, "cam.b": 1}


def test_overlapping_topics_are_forwarded_once(made: list[Any]) -> None:
    """Subscribed to a name and a pattern covering it, a source would deliver twice."""
    a, b = MemoryBroker(), MemoryBroker()
    sub = _memory(made, b)
    sub.subscribe("cam.>")
    bridge = Bridge(_memory(made, a), _memory(made, b), ["cam.a", "cam.*", "cam.a"], loop_window=0)
    assert bridge.topics == ("cam.*",)
    made.append(bridge.start())
    pub = _memory(made, a)
    for i in range(3):
        pub.publish("cam.a", b"%d" % i)
    got = _collect(sub, 4, 1.0)
    assert [m.data for m in got] == [b"0", b"1", b"2"]


# -- loops ---------------------------------------------------------------------------------


def test_echo_store_is_bounded_and_forgets_after_the_window() -> None:
    echoes = _Echoes(window=0.2, max_entries=3)
    keys = [echoes.key("t", b"%d" % i) for i in range(5)]
    for key in keys:
        echoes.add(key)
    assert not echoes.take(keys[0]) and not echoes.take(keys[1])  # evicted (bound)
    assert echoes.take(keys[4]) and not echoes.take(keys[4])  # taken once
    assert echoes.key("t", b"x") != echoes.key("u", b"x")  # per topic
    time.sleep(0.25)
    assert not echoes.take(keys[3])  # expired


def test_two_bridges_both_ways_in_process_stop_the_loop(made: list[Any]) -> None:
    a, b = MemoryBroker(), MemoryBroker()
    ab = Bridge(_memory(made, a), _memory(made, b), ["t.>"])
    ba = Bridge(_memory(made, b), _memory(made, a), ["t.>"])
    made += [ab.start(), ba.start()]
    watch = _memory(made, a)
    watch.subscribe("t.>")
    _memory(made, a).publish("t.x", b"hello")
    got = _collect(watch, 5, 2.0)
    assert [m.data for m in got] == [b"hello", b"hello"]  # the original and one echo
    assert ab.stats().echoes_dropped == 1
    assert (ab.stats().forwarded, ba.stats().forwarded) == (1, 1)


def test_loop_window_zero_turns_the_guard_off(made: list[Any]) -> None:
    a, b = MemoryBroker(), MemoryBroker()
    ab = Bridge(_memory(made, a), _memory(made, b), ["t.>"], loop_window=0)
    made.append(ab.start())
    watch = _memory(made, b)
    watch.subscribe("t.x")
    pub = _memory(made, a)
    for _ in range(3):
        pub.publish("t.x", b"same bytes")  # a constant heartbeat
    assert len(_collect(watch, 3)) == 3


# -- acknowledgement order -----------------------------------------------------------------


class AckingMemory(MemoryPubSub):
    """A memory backend whose deliveries carry tokens, like Kafka's; records acks."""

    capabilities = Capabilities(groups=True, persistent=True, patterns=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.acked: list[bytes] = []
        self._tokens = itertools.count()

    def _subscribe(self, name: str) -> None:
        put = self._queue.put
        self.broker.join(name, None, lambda d: put(d._replace(token=next(self._tokens))))

    def _ack(self, delivery: Any) -> None:
        self.acked.append(delivery.data)


class FlakyDestination(MemoryPubSub):
    """Accepts publishes but fails ``flush()`` while ``down`` is set."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.down = False
        self.flushes = 0

    def _flush(self, timeout: float | None) -> None:
        self.flushes += 1
        if self.down:
            raise BackpressureError("destination away (test)")


def test_receive_ack_false_keeps_messages_until_acknowledge(made: list[Any]) -> None:
    broker = MemoryBroker()
    src = AckingMemory(broker=broker)
    made.append(src)
    src.subscribe("t")
    pub = _memory(made, broker)
    for i in range(3):
        pub.publish("t", b"%d" % i)
    assert src.receive(1, ack=False).data == b"0"
    assert src.receive(1, ack=False).data == b"1"
    assert src.acked == []
    assert src.acknowledge() == 2
    assert src.acked == [b"0", b"1"]
    assert src.receive(1).data == b"2"  # the default: acknowledged with the next take
    assert src.acknowledge() == 0
    src.close()
    assert src.acked == [b"0", b"1", b"2"]


def test_source_acknowledged_only_after_the_destination_confirmed(made: list[Any]) -> None:
    a, b = MemoryBroker(), MemoryBroker()
    src = AckingMemory(broker=a)
    dst = FlakyDestination(broker=b)
    made += [src, dst]
    bridge = Bridge(src, dst, ["t"], retry_interval=0.05)
    made.append(bridge.start())
    pub = _memory(made, a)
    pub.publish("t", b"first")
    deadline = time.monotonic() + 5
    while src.acked != [b"first"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert src.acked == [b"first"]
    dst.down = True
    pub.publish("t", b"second")
    pub.publish("t", b"third")
    while dst.flushes < 5 and time.monotonic() < deadline + 5:
        time.sleep(0.01)
    assert src.acked == [b"first"]  # forwarded, not confirmed: not acknowledged
    assert bridge.stats().pending == 2 and bridge.stats().outage_retries > 0
    dst.down = False
    while src.acked != [b"first", b"second", b"third"] and time.monotonic() < deadline + 10:
        time.sleep(0.01)
    assert src.acked == [b"first", b"second", b"third"]
    assert bridge.stats().confirmed == 3


def test_stopping_while_the_destination_is_away_leaves_the_batch_unacknowledged(
    made: list[Any],
) -> None:
    a, b = MemoryBroker(), MemoryBroker()
    src = AckingMemory(broker=a)
    dst = FlakyDestination(broker=b)
    dst.down = True
    made += [src, dst]
    bridge = Bridge(src, dst, ["t"], retry_interval=0.05).start()
    _memory(made, a).publish("t", b"never confirmed")
    deadline = time.monotonic() + 5
    while bridge.stats().forwarded < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    bridge.stop(10)
    src.close()
    assert src.acked == []
    assert bridge.stats().confirmed == 0


def test_start_reports_subscription_errors_and_stop_is_idempotent(
    made: list[Any],
) -> None:
    a, b = MemoryBroker(), MemoryBroker()
    src, dst = _memory(made, a), _memory(made, b)
    src.close()
    bridge = Bridge(src, dst, ["t"])
    with pytest.raises(Exception, match="closed"):
        bridge.start()
    bridge.stop()
    bridge.stop()


def test_a_persistent_source_without_group_is_warned_about(
    made: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    from msight_core.pubsub.kafka import KafkaPubSub
    from msight_core.pubsub.utils import get_kafka_config

    grouped = KafkaPubSub(get_kafka_config("g", env={}))  # connects lazily: nothing here
    alone = KafkaPubSub(get_kafka_config(env={}))
    made += [grouped, alone]
    dst = _memory(made, MemoryBroker())
    with caplog.at_level("WARNING", logger="msight_core.bridge"):
        Bridge(grouped, dst, ["t"])
        assert "no group_id" not in caplog.text
        Bridge(alone, dst, ["t"])
    assert "KafkaPubSub source has no group_id" in caplog.text
