"""Kafka-specific behaviour on a real tansu broker: groups, offsets, frames, failures."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("confluent_kafka")

from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, NewTopic

from msight_core.config import KafkaConfig, PublishConfig, QueueConfig, Secret
from msight_core.errors import (
    BackpressureError,
    BrokerUnavailableError,
    ClosedError,
    PublishError,
)
from msight_core.pubsub import KafkaPubSub
from msight_core.pubsub.utils import get_kafka_config
from msight_core.testing.brokers import KafkaServer, free_port
from msight_core.testing.conformance import collect

MiB = 1024 * 1024
TEST_ENV = {"MSIGHT_KAFKA_CONSUMER_SESSION_TIMEOUT_MS": "6000"}
HERE = Path(__file__).parent


def _group(topic: str) -> str:
    return "g-" + topic.replace(".", "-")


def _raw_records(address: str, topic: str, count: int, timeout: float = 30) -> list[Any]:
    consumer = Consumer(
        {
            "bootstrap.servers": address,
            "group.id": uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
        }
    )
    consumer.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                out.append(msg)
    finally:
        consumer.close()
    return out


# -- groups -----------------------------------------------------------------------------


def test_two_groups_each_get_everything(
    backends: Callable[..., KafkaPubSub], unique_topic: str
) -> None:
    first = backends(group_id=_group(unique_topic) + "-a")
    second = backends(group_id=_group(unique_topic) + "-b")
    first.subscribe(unique_topic)
    second.subscribe(unique_topic)
    pub = backends()
    sent = [b"m-%d" % i for i in range(200)]
    for payload in sent:
        pub.publish(unique_topic, payload)
    pub.flush()
    for sub in (first, second):
        assert sorted(m.data for m in collect(sub, len(sent), 30)) == sorted(sent)


def test_group_of_two_with_several_publishers_ordered_mode(
    backends: Callable[..., KafkaPubSub], unique_topic: str
) -> None:
    group = _group(unique_topic)
    members = [backends(group_id=group), backends(group_id=group)]
    for member in members:
        member.subscribe(unique_topic)
    publishers = [backends(ordered=True) for _ in range(8)]
    sent = []
    for i in range(50):
        for p, pub in enumerate(publishers):
            payload = b"%d:%d" % (p, i)
            pub.publish(unique_topic, payload)
            sent.append(payload)
    for pub in publishers:
        pub.flush()
    got: list[list[bytes]] = [[], []]
    deadline = time.monotonic() + 30
    while sum(map(len, got)) < len(sent) and time.monotonic() < deadline:
        for idx, member in enumerate(members):
            message = member.receive(0.05)
            if message is not None:
                got[idx].append(message.data)
    assert sorted(got[0] + got[1]) == sorted(sent), "each message exactly once"
    assert got[0] and got[1], "both members get some"
    for received in got:  # ordered mode: each publisher's messages in publish order
        for p in range(len(publishers)):
            seq = [int(d.split(b":")[1]) for d in received if d.startswith(b"%d:" % p)]
            assert seq == sorted(seq)


# -- at-least-once ------------------------------------------------------------------------


def test_resume_after_close_loses_nothing(
    backends: Callable[..., KafkaPubSub], unique_topic: str
) -> None:
    group = _group(unique_topic)
    first = backends(group_id=group)
    first.subscribe(unique_topic)
    pub = backends()
    sent = [b"r-%d" % i for i in range(300)]
    for payload in sent[:200]:
        pub.publish(unique_topic, payload)
    pub.flush()
    seen = [m.data for m in collect(first, 100, 30)]
    assert len(seen) == 100
    first.close()  # commits the 100 processed (the last one in hand included)
    for payload in sent[200:]:
        pub.publish(unique_topic, payload)
    pub.flush()
    second = backends(group_id=group)
    second.subscribe(unique_topic)
    rest = [m.data for m in collect(second, 200, 30)]
    assert second.receive(1.0) is None
    assert set(seen) | set(rest) == set(sent), "nothing lost"
    assert not set(seen) & set(rest), "close() committed everything processed"


def test_sigkilled_subscriber_gets_the_rest_after_restart(
    env: dict[str, str], backends: Callable[..., KafkaPubSub], unique_topic: str
) -> None:
    group = _group(unique_topic)
    sent = [f"k-{i}" for i in range(400)]
    pub = backends()
    pub.publish(unique_topic, b"warm-up")  # creates the topic
    pub.flush()
    args = json.dumps([{**env, "MSIGHT_KAFKA_START": "latest"}, unique_topic, group, 0.01])
    child = subprocess.Popen(
        [sys.executable, str(HERE / "_sigkill_subscriber.py"), args],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "READY"
        for payload in sent:
            pub.publish(unique_topic, payload.encode())
        pub.flush()
        while len(lines) < 150:  # mid-stream, then crash
            line = child.stdout.readline()
            assert line, "subscriber exited early"
            lines.append(line.strip())
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        lines.extend(x.strip() for x in child.stdout.read().splitlines())
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    processed = [x for x in lines if x.startswith("k-")]
    restarted = backends(group_id=group)
    restarted.subscribe(unique_topic)
    rest: list[str] = []
    missing = set(sent) - set(processed)
    deadline = time.monotonic() + 30
    while missing and time.monotonic() < deadline:
        m = restarted.receive(0.5)
        if m is not None and m.data != b"warm-up":
            rest.append(m.data.decode())
            missing.discard(rest[-1])
    assert set(processed) | set(rest) == set(sent), "nothing lost"
    duplicated = set(processed) & set(rest)
    # Only what was processed since the last commit (1 s) is delivered again.
    assert len(duplicated) < 150, f"{len(duplicated)} duplicates"
    assert Counter(rest).most_common(1)[0][1] == 1


def test_slow_application_pauses_instead_of_dropping(
    backends: Callable[..., KafkaPubSub], unique_topic: str
) -> None:
    sub = backends(queue=QueueConfig(max_messages=10, max_bytes=MiB))
    sub.subscribe(unique_topic)
    pub = backends()
    sent = [os.urandom(20_000) for _ in range(300)]  # 6 MB through a 1 MB queue
    for payload in sent:
        pub.publish(unique_topic, payload)
    pub.flush()
    got = []
    deadline = time.monotonic() + 30
    while len(got) < len(sent) and time.monotonic() < deadline:
        message = sub.receive(1.0)
        if message is not None:
            got.append(message.data)
            # The queue's bound, plus the batch listen() took out of it (at most as many).
            assert sub.stats()["queued"] <= 2 * 10
        if len(got) % 50 == 0:
            time.sleep(0.3)  # the application falls behind now and then
    assert sorted(got) == sorted(sent)
    assert sub.stats()["dropped"] == {}


def test_replay_from_earliest_and_from_a_time(
    kafka_server: Any, backends: Callable[..., KafkaPubSub], unique_topic: str
) -> None:
    # One partition: tansu answers "latest" offset queries wrongly (it counts
    # batches), which a time after a partition's last message falls back to.
    admin = AdminClient({"bootstrap.servers": kafka_server.address})
    admin.create_topics([NewTopic(unique_topic, 1, 1)])[unique_topic].result(10)
    sub = backends()
    sub.subscribe(unique_topic)
    pub = backends()
    early = [b"e-%d" % i for i in range(20)]
    for payload in early:
        pub.publish(unique_topic, payload)
    pub.flush()
    assert sorted(m.data for m in collect(sub, 20, 30)) == sorted(early)
    time.sleep(0.05)
    boundary = time.time()
    time.sleep(0.05)
    late = [b"l-%d" % i for i in range(10)]
    for payload in late:
        pub.publish(unique_topic, payload)
    pub.flush()
    assert sorted(m.data for m in collect(sub, 10, 30)) == sorted(late)
    assert sub.replay(unique_topic, "earliest") > 0
    assert sorted(m.data for m in collect(sub, 30, 30)) == sorted(early + late)
    sub.replay(unique_topic, boundary)
    assert sorted(m.data for m in collect(sub, 10, 30)) == sorted(late)
    assert sub.receive(1.0) is None
    with pytest.raises(RuntimeError):
        sub.replay(unique_topic + ".other", "earliest")


# -- topics and frames ----------------------------------------------------------------------


def test_subscribe_before_the_topic_exists(
    kafka_server: Any, backends: Callable[..., KafkaPubSub], unique_topic: str
) -> None:
    admin = AdminClient({"bootstrap.servers": kafka_server.address})
    assert unique_topic not in admin.list_topics(timeout=10).topics
    sub = backends(group_id=_group(unique_topic))
    sub.subscribe(unique_topic)
    pub = backends()
    pub.publish(unique_topic, b"first-ever")
    pub.flush()
    assert [m.data for m in collect(sub, 1, 30)] == [b"first-ever"]
    topic = admin.list_topics(timeout=10).topics[unique_topic]
    assert len(topic.partitions) == KafkaConfig.num_partitions


def test_16mb_frames_on_a_preexisting_1mb_topic_are_split_and_reassembled(
    kafka_server: Any, backends: Callable[..., KafkaPubSub], unique_topic: str
) -> None:
    admin = AdminClient({"bootstrap.servers": kafka_server.address})
    new = NewTopic(unique_topic, 3, 1, config={"max.message.bytes": "1048576"})
    admin.create_topics([new])[unique_topic].result(10)
    sub = backends(group_id=_group(unique_topic))
    sub.subscribe(unique_topic)
    pub = backends()
    frames = [os.urandom(16 * MiB), b"small-plain", os.urandom(16 * MiB + 7)]
    for frame in frames:
        pub.publish(unique_topic, frame)
    pub.flush(60)
    got = [m.data for m in collect(sub, 3, 60)]
    assert sorted(got) == sorted(frames)
    assert sub.receive(1.0) is None
    assert pub.stats()["chunked_frames_sent"] == 2
    # On the wire: every record fits the 1 MB limit; the small one is a plain record.
    records = _raw_records(kafka_server.address, unique_topic, 1 + 2 * 17)
    assert all(len(r.value()) <= 1048576 for r in records)
    plain = [r for r in records if r.value() == b"small-plain"]
    assert len(plain) == 1 and not plain[0].headers()
    assert sum(1 for r in records if r.headers()) == len(records) - 1


def test_16mb_and_64mb_frames_on_a_topic_the_library_creates(
    kafka_server: Any, backends: Callable[..., KafkaPubSub], unique_topic: str
) -> None:
    sub = backends()
    sub.subscribe(unique_topic)
    pub = backends()
    frames = [os.urandom(16 * MiB), os.urandom(64 * MiB)]
    for frame in frames:
        pub.publish(unique_topic, frame)
    pub.flush(60)
    got = [m.data for m in collect(sub, 2, 90)]
    assert sorted(got) == sorted(frames)
    assert pub.stats()["chunked_frames_sent"] == 0  # created with a 64 MiB+ limit


# -- failures --------------------------------------------------------------------------------


def test_delivery_failure_surfaces_as_publish_error(unique_topic: str) -> None:
    with KafkaServer() as server:
        env = {**server.env(), **TEST_ENV, "MSIGHT_KAFKA_PRODUCER_MESSAGE_TIMEOUT_MS": "1500"}
        pub = KafkaPubSub(get_kafka_config(env=env))
        try:
            pub.publish(unique_topic, b"delivered")
            pub.flush(10)
            server.kill()
            for i in range(10):
                pub.publish(unique_topic, b"lost-%d" % i)
            with pytest.raises(PublishError, match=unique_topic):
                pub.flush(10)
            pub.flush(1)  # reported once: nothing new is pending
        finally:
            started = time.monotonic()
            pub.close()
            assert time.monotonic() - started < 15


def test_close_is_bounded_when_the_broker_is_gone(unique_topic: str) -> None:
    with KafkaServer() as server:
        env = {**server.env(), **TEST_ENV, "MSIGHT_PUBLISH_TIMEOUT": "2"}
        pub = KafkaPubSub(get_kafka_config(env=env, connect_timeout=2))
        sub = KafkaPubSub(get_kafka_config("g-close", env=env, connect_timeout=2))
        sub.subscribe(unique_topic)
        pub.publish(unique_topic, b"x")
        pub.flush(10)
        server.kill()
        pub.publish(unique_topic, b"stuck")
        started = time.monotonic()
        with pytest.raises(PublishError):
            pub.close()  # undelivered messages are reported, not silently dropped
        sub.close()
        assert time.monotonic() - started < 20
        with pytest.raises(ClosedError):
            pub.publish(unique_topic, b"y")


def test_unreachable_broker_gives_a_typed_error_quickly(unique_topic: str) -> None:
    config = KafkaConfig(servers=(f"127.0.0.1:{free_port()}",), connect_timeout=2.0)
    backend = KafkaPubSub(config)
    try:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailableError):
            backend.subscribe(unique_topic)
        with pytest.raises(BrokerUnavailableError):
            backend.publish(unique_topic, b"x")
        assert time.monotonic() - started < 15
    finally:
        backend.close()


def test_publish_buffer_bound_gives_backpressure(unique_topic: str) -> None:
    with KafkaServer() as server:
        env = {**server.env(), **TEST_ENV}
        config = get_kafka_config(
            env=env,
            max_message_bytes=1024 * 1024,
            publish=PublishConfig(buffer_bytes=1024 * 1024, timeout=1.0),
        )
        pub = KafkaPubSub(config)
        try:
            pub.publish(unique_topic, b"x")
            pub.flush(10)
            server.kill()
            started = time.monotonic()
            with pytest.raises(BackpressureError):
                for _ in range(100):
                    pub.publish(unique_topic, os.urandom(100_000))
            assert time.monotonic() - started < 10
        finally:
            try:
                pub.close()
            except PublishError:
                pass


def test_secrets_stay_out_of_repr_errors_and_logs(
    unique_topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cr3t-" + uuid.uuid4().hex
    config = KafkaConfig(
        servers=(f"127.0.0.1:{free_port()}",),
        sasl_mechanism="PLAIN",
        sasl_username="user",
        sasl_password=Secret(secret),
        consumer={"ssl.key.password": secret},
        connect_timeout=1.0,
    )
    from msight_core.pubsub._kafka.settings import consumer_conf

    conf = consumer_conf(config, "g", None)
    assert conf["sasl.password"] == secret and conf["security.protocol"] == "SASL_PLAINTEXT"
    assert conf["ssl.key.password"] == secret
    backend = KafkaPubSub(config)
    caplog.set_level(logging.DEBUG)
    errors: list[str] = []
    try:
        for call in (
            lambda: backend.subscribe(unique_topic),
            lambda: backend.publish(unique_topic, b"x"),
        ):
            try:
                call()
            except BrokerUnavailableError as exc:
                errors.append(str(exc) + repr(exc))
    finally:
        backend.close()
    assert errors
    text = repr(backend) + repr(config) + str(config) + "".join(errors) + caplog.text
    assert secret not in text


def test_many_threads_publish_concurrently(
    backends: Callable[..., KafkaPubSub], unique_topic: str
) -> None:
    sub = backends()
    sub.subscribe(unique_topic)
    pub = backends()

    def work(tid: int) -> None:
        for i in range(500):
            pub.publish(unique_topic, b"%d-%d" % (tid, i))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    pub.flush()
    got = [m.data for m in collect(sub, 4000, 30)]
    assert len(got) == 4000 and len(set(got)) == 4000
