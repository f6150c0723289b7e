"""Kafka recovery without user code: lost producer state, vanished topics, bounded
delivery and close times, librdkafka logs routed through ``logging``.

Each test runs its own tansu broker when it kills or deletes something; tansu
keeps everything in memory, so a SIGKILL loses topics, offsets and the
idempotent-producer state, as a real Kafka does when a producer id expires.
"""

from __future__ import annotations

import gc
import logging
import re
import threading
import time
from typing import Any

import pytest

pytest.importorskip("confluent_kafka")

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from msight_core.config import load_kafka_config
from msight_core.errors import MsightError, PublishError
from msight_core.pubsub import KafkaPubSub
from msight_core.pubsub._kafka.settings import producer_conf
from msight_core.pubsub.utils import get_kafka_config
from msight_core.testing.brokers import KafkaServer

TEST_ENV = {"MSIGHT_KAFKA_CONSUMER_SESSION_TIMEOUT_MS": "6000"}
quiet = logging.getLogger("test.kafka.admin")


def _admin(address: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": address, "logger": quiet})


def _create(address: str, topic: str, partitions: int) -> None:
    admin = _admin(address)  # kept alive until the future resolves
    futures = admin.create_topics([NewTopic(topic, partitions, 1)])
    try:
        futures[topic].result(10)
    except Exception as exc:
        if "exist" not in str(exc).lower():
            raise


def _read_all(address: str, topic: str, expected: set[bytes], timeout: float) -> set[bytes]:
    """Every value in ``topic`` from the beginning, until ``expected`` is covered."""
    conf = {"bootstrap.servers": address, "group.id": "reader", "logger": quiet}
    consumer = Consumer({**conf, "enable.auto.commit": False})
    got: set[bytes] = set()
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, -2) for p in meta.partitions])
        deadline = time.monotonic() + timeout
        while not expected <= got and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.2):
                if msg.error() is None:
                    got.add(msg.value())
    finally:
        consumer.close()
    return got


def _topic_shape(address: str, topic: str) -> tuple[int, str | None]:
    admin = _admin(address)
    partitions = len(admin.list_topics(timeout=10).topics[topic].partitions)
    resource = ConfigResource("topic", topic)
    entries = admin.describe_configs([resource])[resource].result(10)
    entry = entries.get("max.message.bytes")
    return partitions, getattr(entry, "value", None)


# -- 1. a producer whose idempotence state the broker lost --------------------------------


def test_publisher_recovers_when_the_broker_lost_its_producer_state(
    unique_topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Without recovery the producer is fatal (every publish() raises) or loops on
    UNKNOWN_PRODUCER_ID until its messages time out."""
    caplog.set_level(logging.WARNING, logger="msight_core")
    with KafkaServer() as server:
        env = {**server.env(), **TEST_ENV, "MSIGHT_PUBLISH_TIMEOUT": "5"}
        pub = KafkaPubSub(get_kafka_config(env=env))
        refused: list[str] = []
        accepted: list[tuple[float, bytes]] = []
        stop = threading.Event()

        def publish() -> None:
            i = 0
            while not stop.is_set():
                payload = b"m-%06d" % i
                i += 1
                try:
                    pub.publish(unique_topic, payload)
                except MsightError as exc:
                    refused.append(f"{type(exc).__name__}: {exc}"[:200])
                else:
                    accepted.append((time.monotonic(), payload))
                time.sleep(0.001)

        thread = threading.Thread(target=publish, daemon=True)
        try:
            pub.publish(unique_topic, b"first")
            pub.flush(10)
            thread.start()
            time.sleep(1.0)
            server.kill()  # messages are in flight: their retries meet a blank broker
            time.sleep(0.7)
            server.restart()
            back = time.monotonic()
            _create(server.address, unique_topic, get_kafka_config(env=env).num_partitions)
            time.sleep(3.0)
            stop.set()
            thread.join(15)
            assert not thread.is_alive(), "publish() hung"
            pub.flush(20)  # everything accepted is delivered or re-sent; no PublishError
            stats = pub.stats()
        finally:
            stop.set()
            pub.close()
        after = {payload for t, payload in accepted if t > back}
        got = _read_all(server.address, unique_topic, after, 20)
    assert not refused, refused[:3]
    assert stats["producer_rebuilds"] >= 1, stats
    assert after and after <= got, (len(after - got), "accepted after the restart, not stored")
    assert not [r for r in caplog.records if r.exc_info], "a thread logged a traceback"


# -- 2. a topic that disappears ----------------------------------------------------------


def test_a_vanished_topic_is_created_again_with_the_library_settings(unique_topic: str) -> None:
    """The broker lost the topic (tansu restarted; on a real Kafka: deleted) while
    the publisher still knew it: without recovery its limit stays cached, nothing
    creates the topic again and the messages wait for librdkafka's timeout."""
    with KafkaServer() as server:
        env = {**server.env(), **TEST_ENV, "MSIGHT_PUBLISH_TIMEOUT": "5"}
        config = get_kafka_config(env=env, num_partitions=4, max_message_bytes=3 * 1024 * 1024)
        pub = KafkaPubSub(config)
        try:
            pub.publish(unique_topic, b"before")
            pub.flush(10)
            assert _topic_shape(server.address, unique_topic) == (4, str(3 * 1024 * 1024))
            server.kill()
            time.sleep(0.5)
            server.restart()  # without the topic
            sent = {b"after-%d" % i for i in range(40)}
            started = time.monotonic()
            for payload in sorted(sent):
                pub.publish(unique_topic, payload)
                time.sleep(0.01)
            pub.flush(14)  # within the 15 s delivery timeout: re-created, not timed out
            elapsed = time.monotonic() - started
            stats = pub.stats()
        finally:
            try:
                pub.close()
            except PublishError:
                pass
        shape = _topic_shape(server.address, unique_topic)
        got = _read_all(server.address, unique_topic, sent, 20)
    assert shape == (4, str(3 * 1024 * 1024)), shape
    assert sent <= got, (len(sent - got), stats)
    assert elapsed < 10, elapsed


def test_undeliverable_messages_fail_within_the_delivery_timeout(unique_topic: str) -> None:
    """librdkafka's default message timeout is 300 s; ours follows the publish timeout."""
    with KafkaServer() as server:
        env = {**server.env(), **TEST_ENV, "MSIGHT_PUBLISH_TIMEOUT": "1"}
        pub = KafkaPubSub(get_kafka_config(env=env))
        try:
            pub.publish(unique_topic, b"x")
            pub.flush(10)
            server.kill()
            for i in range(5):
                pub.publish(unique_topic, b"lost-%d" % i)
            started = time.monotonic()
            with pytest.raises(PublishError, match=re.escape(unique_topic)):
                pub.flush(20)
            elapsed = time.monotonic() - started
        finally:
            try:
                pub.close()
            except PublishError:
                pass
    assert elapsed < 8, elapsed  # 3 x the 1 s publish timeout, plus reporting


def test_delivery_timeout_setting() -> None:
    config = load_kafka_config(env={"MSIGHT_PUBLISH_TIMEOUT": "4"})
    assert producer_conf(config, None, None)["message.timeout.ms"] == 12_000
    config = load_kafka_config(env={"MSIGHT_KAFKA_DELIVERY_TIMEOUT": "2.5"})
    assert config.delivery_timeout == 2.5
    assert producer_conf(config, None, None)["message.timeout.ms"] == 2500
    passthrough = load_kafka_config(env={"MSIGHT_KAFKA_PRODUCER_MESSAGE_TIMEOUT_MS": "777"})
    assert producer_conf(passthrough, None, None)["message.timeout.ms"] == "777"


# -- 3. logs -------------------------------------------------------------------------------


def test_outage_logs_go_through_logging_without_flooding(
    unique_topic: str, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """No raw ``%3|...|FAIL|`` lines on stderr from any client the library made,
    and reconnect attempts are not logged at ERROR, nor one line each."""
    caplog.set_level(logging.INFO, logger="msight_core")
    with KafkaServer() as server:
        env = {**server.env(), **TEST_ENV, "MSIGHT_PUBLISH_TIMEOUT": "2"}
        sub = KafkaPubSub(get_kafka_config("g-logs", env=env, connect_timeout=2))
        pub = KafkaPubSub(get_kafka_config(env=env, connect_timeout=2))
        sub.subscribe(unique_topic)
        pub.publish(unique_topic, b"x")
        pub.flush(10)
        server.kill()
        time.sleep(4.0)  # librdkafka retries the connection many times meanwhile
        for backend in (sub, pub):
            try:
                backend.close()
            except PublishError:
                pass
        del sub, pub
        gc.collect()  # destroy every client while the broker is still away
        time.sleep(0.5)
    raw = [line for line in capfd.readouterr().err.splitlines() if re.match(r"%\d\|", line)]
    assert not raw, raw[:5]
    rdkafka = [r for r in caplog.records if r.name.endswith(".librdkafka")]
    fails = [r for r in rdkafka if r.getMessage().startswith("FAIL ")]
    assert fails, "the outage was not logged at all"
    assert all(r.levelno <= logging.WARNING for r in fails), [r.getMessage()[:120] for r in fails]
    # Once per client at WARNING within the interval, not once per attempt.
    warned = [r for r in fails if r.levelno == logging.WARNING]
    assert len(warned) <= 4, [r.getMessage()[:120] for r in warned]


# -- 4. close when the broker is gone ------------------------------------------------------


def test_close_with_the_broker_gone_is_bounded_by_the_publish_timeout(unique_topic: str) -> None:
    with KafkaServer() as server:
        env = {**server.env(), **TEST_ENV, "MSIGHT_PUBLISH_TIMEOUT": "2"}
        sub = KafkaPubSub(get_kafka_config("g-gone", env=env, connect_timeout=5))
        pub = KafkaPubSub(get_kafka_config(env=env, connect_timeout=5))
        sub.subscribe(unique_topic)
        pub.publish(unique_topic, b"x")
        pub.flush(10)
        message = sub.receive(30)
        assert message is not None
        assert sub.receive(0.1) is None  # acknowledges x: there is an offset to commit
        server.kill()
        pub.publish(unique_topic, b"stuck")
        started = time.monotonic()
        sub.close()
        sub_s = time.monotonic() - started
        with pytest.raises(PublishError):
            pub.close()
        both_s = time.monotonic() - started
    assert sub_s < 2.0 + 1.5, sub_s  # not connect_timeout + 5 s
    assert both_s < 2 * 2.0 + 2.0, both_s


def test_close_commits_when_the_broker_is_reachable(kafka_server: Any, unique_topic: str) -> None:
    env = {**kafka_server.env(), **TEST_ENV}
    group = "g-commit-" + unique_topic.replace(".", "-")
    pub = KafkaPubSub(get_kafka_config(env=env))
    sub = KafkaPubSub(get_kafka_config(group, env=env))
    try:
        sub.subscribe(unique_topic)
        for i in range(5):
            pub.publish(unique_topic, b"c-%d" % i)
        pub.flush(10)
        got = []
        while len(got) < 5:
            message = sub.receive(30)
            assert message is not None
            got.append(message.data)
        sub.close()  # commits all five (the last one in hand too)
        pub.publish(unique_topic, b"c-5")
        pub.flush(10)
        again = KafkaPubSub(get_kafka_config(group, env=env))
        try:
            again.subscribe(unique_topic)
            message = again.receive(30)
            assert message is not None and message.data == b"c-5"
        finally:
            again.close()
    finally:
        pub.close()
