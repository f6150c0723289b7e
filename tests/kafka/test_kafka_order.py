"""Per-publisher order and balance on a real tansu broker (issue 16 item 1), and
hostile stamps and chunks from a raw producer (issue 15 row 4)."""

from __future__ import annotations

import os
import resource
import struct
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("confluent_kafka")

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from msight_core.pubsub import KafkaPubSub
from msight_core.pubsub._kafka.chunks import (
    CHUNK_HEADER,
    CHUNK_STRUCT,
    FRAME_TIMEOUT,
    MAX_OPEN_FRAMES,
)
from msight_core.pubsub._kafka.stamps import stamp
from msight_core.pubsub.utils import get_kafka_config
from msight_core.testing.conformance import collect

MiB = 1024 * 1024


def _raw_producer(address: str) -> Producer:
    return Producer({"bootstrap.servers": address, "linger.ms": 1, "message.max.bytes": 4 * MiB})


def _create(address: str, topic: str, partitions: int, **config: str) -> None:
    admin = AdminClient({"bootstrap.servers": address})
    admin.create_topics([NewTopic(topic, partitions, 1, config=config)])[topic].result(10)


def _seqs(received: list[bytes], prefix: bytes = b"") -> list[int]:
    return [int(d.split(b":")[-1]) for d in received if d.startswith(prefix)]


def test_one_publisher_is_balanced_over_a_group_and_each_member_sees_its_share_in_order(
    backends: Callable[..., KafkaPubSub], unique_topic: str
) -> None:
    group = "g-" + unique_topic.replace(".", "-")
    members = [backends(group_id=group), backends(group_id=group)]
    for member in members:
        member.subscribe(unique_topic)
    pub = backends()
    sent = [b"one:%d" % i for i in range(600)]
    for payload in sent:
        pub.publish(unique_topic, payload)
    pub.flush()
    got: list[list[bytes]] = [[], []]
    deadline = time.monotonic() + 30
    while sum(map(len, got)) < len(sent) and time.monotonic() < deadline:
        for idx, member in enumerate(members):
            message = member.receive(0.02)
            if message is not None:
                got[idx].append(message.data)
    assert sorted(got[0] + got[1]) == sorted(sent)
    # Balanced: one publisher's stream is shared (6 partitions, range-assigned 3 + 3).
    assert 200 <= len(got[0]) <= 400, [len(g) for g in got]
    for received in got:
        assert _seqs(received) == sorted(_seqs(received))
    assert all(m.stats()["order_gaps"] == 0 for m in members)


def test_bursts_reach_two_broadcast_subscribers_in_publish_order(
    backends: Callable[..., KafkaPubSub], unique_topic: str
) -> None:
    subs = [backends(), backends()]
    for sub in subs:
        sub.subscribe(unique_topic)
    pubs = [backends(), backends()]
    frame = os.urandom(64 * 1024)
    for i in range(300):  # a burst of frames from two publishers, interleaved
        for p, pub in enumerate(pubs):
            pub.publish(unique_topic, b"p%d:%d:" % (p, i) + frame)
    for pub in pubs:
        pub.flush()
    for sub in subs:
        got = [m.data[:16].split(b":") for m in collect(sub, 600, 60)]
        missing = {
            p: sorted(set(range(300)) - {int(g[1]) for g in got if g[0] == p})
            for p in (b"p0", b"p1")
        }
        assert len(got) == 600, (missing, sub.stats(), [pub.stats() for pub in pubs])
        for p in (b"p0", b"p1"):
            assert [int(g[1]) for g in got if g[0] == p] == list(range(300))
        assert sub.stats()["order_gaps"] == 0


def test_raw_consumers_see_the_published_bytes_and_raw_records_pass_through(
    kafka_server: Any, backends: Callable[..., KafkaPubSub], unique_topic: str
) -> None:
    sub = backends()
    sub.subscribe(unique_topic)
    pub = backends()
    pub.publish(unique_topic, b"from-msight")
    pub.flush()
    raw = _raw_producer(kafka_server.address)
    raw.produce(unique_topic, b"from-raw", b"some-key")
    raw.produce(unique_topic, b"from-raw-no-key")
    raw.flush(10)
    got = sorted(m.data for m in collect(sub, 3, 30))
    assert got == [b"from-msight", b"from-raw", b"from-raw-no-key"]
    consumer = Consumer({"bootstrap.servers": kafka_server.address, "group.id": uuid.uuid4().hex})
    parts = consumer.list_topics(unique_topic, timeout=10).topics[unique_topic].partitions
    consumer.assign([TopicPartition(unique_topic, p, OFFSET_BEGINNING) for p in parts])
    values = []
    deadline = time.monotonic() + 30
    while len(values) < 3 and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and msg.error() is None:
            values.append(msg.value())
    consumer.close()
    assert sorted(values) == got  # the value is exactly what was published


def test_forged_stamps_cost_their_own_message_and_never_stall_others(
    kafka_server: Any, backends: Callable[..., KafkaPubSub], unique_topic: str
) -> None:
    _create(kafka_server.address, unique_topic, 6)
    sub = backends(order_wait=0.3)
    sub.subscribe(unique_topic)
    pub = backends()
    raw = _raw_producer(kafka_server.address)
    victim = os.urandom(8)
    forged = [
        (stamp(victim, 5, 6), 2),  # seq 5 of a rotation starting at 3: waits for 0..4
        (stamp(victim, 2**63, 6), 0),  # far in the future
        (stamp(victim, 7, 6), 0),  # does not add up with the rotation above
        (stamp(os.urandom(8), 1, 0), 1),  # no rotation
        (b"\x00msq" + os.urandom(3), 4),  # too short
    ]
    started = time.monotonic()
    for key, part in forged:
        raw.produce(unique_topic, b"forged", key, part)
    raw.flush(10)
    sent = [b"real:%d" % i for i in range(200)]
    for payload in sent:
        pub.publish(unique_topic, payload)
    pub.flush()
    got = [m.data for m in collect(sub, len(sent) + len(forged), 30)]
    assert sorted(d for d in got if d != b"forged") == sorted(sent)
    assert got.count(b"forged") == len(forged)  # each forged record is delivered, once
    assert _seqs([d for d in got if d.startswith(b"real")]) == list(range(200))
    assert time.monotonic() - started < 10
    stats = sub.stats()
    assert stats["unordered"] >= 3


def test_forged_chunks_are_bounded_and_the_next_valid_message_arrives(
    kafka_server: Any, backends: Callable[..., KafkaPubSub], unique_topic: str
) -> None:
    """Issue 15 row 4: 300 forged first chunks of 1 MiB each, claiming 200 MiB frames."""
    _create(kafka_server.address, unique_topic, 3, **{"max.message.bytes": str(2 * MiB)})
    group = "g-" + unique_topic.replace(".", "-")
    # The subscriber's bound on unfinished frames: its receive queue's byte bound.
    queue = get_kafka_config(env={"MSIGHT_QUEUE_MAX_BYTES": str(32 * MiB)}).queue
    sub = backends(group_id=group, max_message_bytes=8 * MiB, queue=queue)
    sub.subscribe(unique_topic)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    raw = _raw_producer(kafka_server.address)
    junk = os.urandom(MiB)
    for i in range(300):
        if i % 2:
            header = CHUNK_STRUCT.pack(os.urandom(16), 0, 200, 200 * MiB)  # claims 200 MiB
        else:  # the header of earlier versions (no frame size), as in the issue
            header = struct.pack(">16sII", os.urandom(16), 0, 200)
        raw.produce(unique_topic, junk, None, i % 3, headers=[(CHUNK_HEADER, header)])
        if i % 50 == 0:
            raw.flush(10)
    for bad in (b"short", CHUNK_STRUCT.pack(os.urandom(16), 5, 2, 10)):
        raw.produce(unique_topic, b"x", None, 0, headers=[(CHUNK_HEADER, bad)])
    raw.flush(30)
    pub = backends()
    valid = [b"valid-after-forgery-%d" % i for i in range(6)]  # every partition
    for payload in valid:
        pub.publish(unique_topic, payload)
    big = os.urandom(5 * MiB)  # split on this 2 MiB topic, and within the bounds
    pub.publish(unique_topic, big)
    pub.flush(30)
    got = [m.data for m in collect(sub, 7, 60)]
    assert got == [*valid, big]
    stats = sub.stats()
    assert stats["incomplete_frames_dropped"] >= 300
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    # Bounded by the subscriber's byte bound (plus fetch buffers), not 300 x 1 MiB.
    assert grown_mib < 200, grown_mib
    # Dropped frames pin no offset: what was processed is committed past them.
    sub.close()
    again = backends(group_id=group)
    again.subscribe(unique_topic)
    assert again.receive(2.0) is None


def test_hundreds_of_forged_frames_that_fit_are_capped_and_pin_no_offset_for_good(
    kafka_server: Any, backends: Callable[..., KafkaPubSub], unique_topic: str
) -> None:
    """Issue 15 row 4, the frames a subscriber would hold: 300 forged first chunks
    of 256 KiB that each claim a 2-chunk frame within every bound. Unfinished
    frames are capped per partition and in bytes (counted drops), the valid
    messages behind them arrive, and once the last open frame timed out the
    committed offset moves past all of them."""
    _create(kafka_server.address, unique_topic, 3, **{"max.message.bytes": str(2 * MiB)})
    group = "g-" + unique_topic.replace(".", "-")
    queue = get_kafka_config(env={"MSIGHT_QUEUE_MAX_BYTES": str(16 * MiB)}).queue
    sub = backends(group_id=group, max_message_bytes=8 * MiB, queue=queue)
    sub.subscribe(unique_topic)
    raw = _raw_producer(kafka_server.address)
    chunk = os.urandom(256 * 1024)
    for i in range(300):
        header = CHUNK_STRUCT.pack(os.urandom(16), 0, 2, 2 * len(chunk) - 1)
        raw.produce(unique_topic, chunk, None, i % 3, headers=[(CHUNK_HEADER, header)])
        if i % 50 == 0:
            raw.flush(10)
    raw.flush(30)
    pub = backends()
    valid = [b"valid-%d" % i for i in range(6)]
    for payload in valid:
        pub.publish(unique_topic, payload)
    pub.flush(30)
    assert [m.data for m in collect(sub, len(valid), 60)] == valid
    dropped = sub.stats()["incomplete_frames_dropped"]
    # At most MAX_OPEN_FRAMES (8) per partition, and 16 MiB (64 frames) in all, stay open.
    assert dropped >= 300 - 3 * MAX_OPEN_FRAMES, dropped
    # The open ones time out (FRAME_TIMEOUT); later messages are then committed past them.
    deadline = time.monotonic() + FRAME_TIMEOUT + 15
    while sub.stats()["incomplete_frames_dropped"] < 300 and time.monotonic() < deadline:
        sub.receive(0.5)
    assert sub.stats()["incomplete_frames_dropped"] == 300
    after = [b"after-%d" % i for i in range(6)]
    for payload in after:
        pub.publish(unique_topic, payload)
    pub.flush(30)
    assert [m.data for m in collect(sub, len(after), 30)] == after
    sub.close()
    again = backends(group_id=group)
    again.subscribe(unique_topic)
    assert again.receive(2.0) is None  # nothing pinned: everything was committed


@pytest.mark.parametrize("grouped", [False, True], ids=["broadcast", "group"])
def test_wildcard_picks_up_a_topic_created_after_subscribing(
    kafka_server: Any, backends: Callable[..., KafkaPubSub], unique_topic: str, grouped: bool
) -> None:
    """Issue 20 item 5 on Kafka: ``camera1.>`` and ``camera1.*.frames`` follow topics
    that appear later (within the metadata refresh interval, plus a rebalance for a
    group), from their first message, in order, with the real topic on each message,
    and whole tokens only."""
    existing = f"{unique_topic}.cam.frames"
    _create(kafka_server.address, existing, 3)
    group = "g-" + unique_topic.replace(".", "-") if grouped else None
    sub = backends(group_id=group)
    sub.subscribe(f"{unique_topic}.*.frames")
    sub.subscribe(f"{unique_topic}.deep.>")
    pub = backends()
    later = [f"{unique_topic}.late.frames", f"{unique_topic}.deep.a.b"]
    unwanted = [f"{unique_topic}.late.frames.x", f"{unique_topic}x.deep.a", f"{unique_topic}.deep"]
    for name in [*later, *unwanted]:  # created now, after the subscriptions
        _create(kafka_server.address, name, 3)
    for i in range(50):
        for name in [existing, *later, *unwanted]:
            pub.publish(name, f"{name}:{i}".encode())
    pub.flush(30)
    got: dict[str, list[int]] = {}
    deadline = time.monotonic() + 45
    while sum(map(len, got.values())) < 150 and time.monotonic() < deadline:
        message = sub.receive(0.5)
        if message is not None:
            name, _, i = message.data.decode().rpartition(":")
            assert message.topic == name
            got.setdefault(name, []).append(int(i))
    assert got == {name: list(range(50)) for name in [existing, *later]}
    assert sub.receive(1.0) is None


def test_transaction_markers_are_read_past_with_nothing_lost_or_repeated(
    kafka_server: Any, backends: Callable[..., KafkaPubSub], unique_topic: str
) -> None:
    # A transactional producer leaves a control record after each commit: an
    # offset the consumer never gets. msight reads each such hole once more (a
    # fetch that skipped records looks the same, see _kafka.holes), then goes on.
    sub = backends()
    sub.subscribe(unique_topic)
    raw = Producer({"bootstrap.servers": kafka_server.address, "transactional.id": unique_topic})
    raw.init_transactions(10)
    for t in range(3):
        raw.begin_transaction()
        for i in range(5):
            raw.produce(unique_topic, b"%d:%d" % (t, i), partition=0)
        raw.commit_transaction(10)
    got = [m.data for m in collect(sub, 15, 30)]
    assert got == [b"%d:%d" % (t, i) for t in range(3) for i in range(5)]
    assert collect(sub, 1, 1.0) == []  # nothing twice
    stats = sub.stats()
    assert stats["fetch_rereads"] == 2, stats  # the markers after the first two commits
    assert stats["fetch_offsets_skipped"] == 2, stats
