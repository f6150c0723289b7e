"""NATS-specific behaviour on real nats-server processes: large frames, queue
groups, server restarts, JetStream resume, authentication."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import nats
import pytest

from msight_core.errors import (
    AuthenticationError,
    BrokerUnavailableError,
    InvalidTopicError,
    PayloadTooLargeError,
    PublishError,
)
from msight_core.pubsub import NATSPubSub
from msight_core.pubsub._nats.frames import LargeFrames
from msight_core.pubsub.utils import get_nats_config
from msight_core.testing.brokers import NatsServer
from msight_core.testing.conformance import collect

MiB = 1024 * 1024


def frame(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-looking bytes (catches misplaced chunks)."""
    block = os.urandom(4096) if seed < 0 else bytes((i * 31 + seed) % 251 for i in range(4093))
    return (block * (size // len(block) + 1))[:size]


@pytest.fixture
def make(nats_server: NatsServer) -> Iterator[Any]:
    made: list[NATSPubSub] = []

    def build(group_id: str | None = None, server: NatsServer | None = None, **env: str) -> Any:
        full = {**(server or nats_server).env(), **env}
        backend = NATSPubSub(get_nats_config(group_id, env=full))
        made.append(backend)
        return backend

    yield build
    for backend in made:
        backend.close()


def _digest(data: bytes) -> str:
    return f"{len(data)}:{hashlib.sha1(data).hexdigest()[:12]}"


def _drain_group(members: list[Any], count: int, timeout: float) -> list[list[bytes]]:
    received: list[list[bytes]] = [[] for _ in members]
    deadline = time.monotonic() + timeout
    while sum(map(len, received)) < count and time.monotonic() < deadline:
        for idx, member in enumerate(members):
            message = member.receive(0.05)
            if message is not None:
                received[idx].append(message.data)
    return received


# -- plain NATS semantics ---------------------------------------------------------


def test_small_messages_are_plain_nats_messages(
    make: Any, nats_server: NatsServer, unique_topic: str
) -> None:
    """A non-msight nats-py subscriber reads exactly the published bytes."""
    import asyncio

    import nats

    got: list[tuple[bytes, Any]] = []
    ready = threading.Event()
    done = threading.Event()

    async def raw_subscriber() -> None:
        nc = await nats.connect(nats_server.url)
        sub = await nc.subscribe(unique_topic)
        await nc.flush()
        ready.set()
        msg = await sub.next_msg(timeout=10)
        got.append((msg.data, msg.headers))
        await nc.close()
        done.set()

    thread = threading.Thread(target=lambda: asyncio.run(raw_subscriber()), daemon=True)
    thread.start()
    assert ready.wait(10)
    pub = make()
    pub.publish(unique_topic, b"\x00raw\xffbytes")
    pub.flush()
    assert done.wait(10)
    assert got == [(b"\x00raw\xffbytes", None)]


def test_queue_group_two_members_each_message_once(make: Any, unique_topic: str) -> None:
    members = [make(group_id="qg"), make(group_id="qg")]
    for member in members:
        member.subscribe(unique_topic)
    outsider = make()  # no group: gets everything
    outsider.subscribe(unique_topic)
    pub = make()
    sent = [b"q-%d" % i for i in range(500)]
    for payload in sent:
        pub.publish(unique_topic, payload)
    pub.flush()
    received = _drain_group(members, len(sent), 15)
    assert sorted(received[0] + received[1]) == sorted(sent)
    assert received[0] and received[1]
    assert [m.data for m in collect(outsider, len(sent), 15)] == sent


def test_publish_from_threads_keeps_each_threads_order(make: Any, unique_topic: str) -> None:
    sub = make()
    sub.subscribe(unique_topic)
    pub = make()

    def worker(k: int) -> None:
        for i in range(2000):
            pub.publish(unique_topic, b"%d:%d" % (k, i))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    pub.flush()
    got = [m.data for m in collect(sub, 8000, 20)]
    assert len(got) == 8000
    for k in range(4):
        mine = [int(d.split(b":")[1]) for d in got if d.startswith(b"%d:" % k)]
        assert mine == list(range(2000))


# -- large frames -----------------------------------------------------------------


@pytest.mark.parametrize("jetstream", ["false", "true"])
def test_large_frames_broadcast_and_in_order(make: Any, unique_topic: str, jetstream: str) -> None:
    subs = [make(MSIGHT_NATS_JETSTREAM=jetstream), make(MSIGHT_NATS_JETSTREAM=jetstream)]
    for sub in subs:
        sub.subscribe(unique_topic)
    pub = make(MSIGHT_NATS_JETSTREAM=jetstream)
    frames = [
        frame(64 * MiB, 1),
        b"small",
        frame(3 * MiB + 17, 2),
        frame(MiB, 3),
        frame(MiB + 1, 4),
    ]
    for payload in frames:
        pub.publish(unique_topic, payload)
    pub.flush(60)
    for sub in subs:
        got = [m.data for m in collect(sub, len(frames), 60)]
        assert [len(g) for g in got] == [len(f) for f in frames]
        assert got == frames
    # Exactly max_payload fits a plain message; JetStream mode adds a Nats-Msg-Id header.
    assert pub.stats()["large_frames_sent"] == (4 if jetstream == "true" else 3)


@pytest.mark.parametrize("jetstream", ["false", "true"])
def test_large_frames_go_whole_to_one_group_member(
    make: Any, unique_topic: str, jetstream: str
) -> None:
    members = [make("big", MSIGHT_NATS_JETSTREAM=jetstream) for _ in range(2)]
    for member in members:
        member.subscribe(unique_topic)
    pub = make(MSIGHT_NATS_JETSTREAM=jetstream)
    frames = [frame(16 * MiB, seed) for seed in range(6)]
    for payload in frames:
        pub.publish(unique_topic, payload)
    pub.flush(60)
    received = _drain_group(members, len(frames), 60)
    # Compared by digest: a failure shows which frames are missing, not 96 MB of bytes.
    assert sorted(map(_digest, received[0] + received[1])) == sorted(map(_digest, frames))


def test_large_frame_without_jetstream_raises_in_jetstream_mode_only(unique_topic: str) -> None:
    """Core mode sends large frames over core NATS (test_nats_core_frames.py); JetStream
    mode stores them, so a server without JetStream refuses them before sending."""
    with NatsServer(jetstream=False) as server:
        sub = NATSPubSub(get_nats_config(env=server.env()))
        pub = NATSPubSub(get_nats_config(env=server.env()))
        try:
            sub.subscribe(unique_topic)
            pub.publish(unique_topic, b"before")
            pub.publish(unique_topic, frame(MiB + 1))
            pub.publish(unique_topic, b"after")
            pub.flush()
            assert [m.data for m in collect(sub, 3, 10)] == [b"before", frame(MiB + 1), b"after"]
            large = LargeFrames(60.0, 1024 * MiB, 5.0)  # as in JetStream mode
            with pytest.raises(PayloadTooLargeError, match="max_payload"):
                large.admit(MiB + 1, MiB, False, None, None)  # type: ignore[arg-type]
        finally:
            pub.close()
            sub.close()


def test_raised_max_payload_carries_frames_as_plain_messages(unique_topic: str) -> None:
    with NatsServer(jetstream=False, max_payload=8 * MiB) as server:
        sub = NATSPubSub(get_nats_config(env=server.env()))
        pub = NATSPubSub(get_nats_config(env=server.env()))
        try:
            sub.subscribe(unique_topic)
            payload = frame(8 * MiB)
            pub.publish(unique_topic, payload)
            pub.flush()
            assert [m.data for m in collect(sub, 1, 10)] == [payload]
            assert pub.stats()["large_frames_sent"] == 0
        finally:
            pub.close()
            sub.close()


def test_mixed_sizes_from_threads_reach_a_plain_client_exact_and_in_order(
    unique_topic: str,
) -> None:
    """Large payloads are written straight to the socket, small ones through
    nats-py's buffer: the wire stays valid (a plain nats-py subscriber reads every
    message) and each thread's order is kept."""
    # About 40 MB in all: a burst above the server's 64 MB max_pending would get
    # the subscribers disconnected as slow consumers, which is not under test here.
    sizes = [0, 10, 200_000, 1024, 2 * MiB, 131_072, 131_071, 3, 3 * MiB + 5, 700_000]

    async def plain_subscriber(url: str, expected: int, out: list[bytes]) -> None:
        nc = await nats.connect(url)
        done = asyncio.Event()

        async def on_msg(msg: Any) -> None:
            out.append(msg.data)
            if len(out) == expected:
                done.set()

        await nc.subscribe(unique_topic, cb=on_msg, pending_bytes_limit=1 << 30)
        await nc.flush()
        ready.set()
        await asyncio.wait_for(done.wait(), 60)
        await nc.close()

    with NatsServer(jetstream=False, max_payload=8 * MiB) as server:
        pub = NATSPubSub(get_nats_config(env=server.env()))
        sub = NATSPubSub(get_nats_config(env=server.env()))
        sub.subscribe(unique_topic)
        ready = threading.Event()
        plain: list[bytes] = []
        threads, rounds = 3, 2
        total = threads * rounds * len(sizes)
        reader = threading.Thread(
            target=lambda: asyncio.run(plain_subscriber(server.url, total, plain))
        )
        reader.start()
        assert ready.wait(10)

        def worker(k: int) -> None:
            for r in range(rounds):
                for i, size in enumerate(sizes):
                    tag = b"%d:%d:%d:" % (k, r, i)
                    pub.publish(unique_topic, (tag + frame(size, k + i))[: max(size, len(tag))])

        try:
            workers = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            pub.flush(30)
            reader.join(60)
            got = [m.data for m in collect(sub, total, 30)]
            for seen in (plain, got):
                assert len(seen) == total
                for k in range(threads):
                    mine = [d for d in seen if d.startswith(b"%d:" % k)]
                    expect = [
                        (b"%d:%d:%d:" % (k, r, i) + frame(size, k + i))[: max(size, 6)]
                        for r in range(rounds)
                        for i, size in enumerate(sizes)
                    ]
                    assert [len(d) for d in mine] == [len(e) for e in expect]
                    assert mine == expect
        finally:
            pub.close()
            sub.close()


# -- restarts ---------------------------------------------------------------------


def test_core_nats_survives_a_server_restart(unique_topic: str, caplog: Any) -> None:
    caplog.set_level(logging.WARNING, logger="msight_core")
    with NatsServer(jetstream=False) as server:
        members = [NATSPubSub(get_nats_config("grp", env=server.env())) for _ in range(2)]
        pub = NATSPubSub(get_nats_config(env=server.env()))
        try:
            for member in members:
                member.subscribe(unique_topic)
            pub.publish(unique_topic, b"before")
            pub.flush()
            assert sum(len(collect(m, 1, 0.5)) for m in members) == 1
            server.kill()
            for i in range(50):  # buffered while the server is down
                pub.publish(unique_topic, b"during-%d" % i)
            server.restart()
            restarted = time.monotonic()
            pub.flush(10)
            # Resubscription is asynchronous: publish until the group hears again.
            heard: list[bytes] = []
            while not heard and time.monotonic() - restarted < 10:
                pub.publish(unique_topic, b"after")
                pub.flush(5)
                for member in members:
                    heard += [m.data for m in collect(member, 1, 0.1)]
            assert heard, "no delivery after the server came back"
            assert time.monotonic() - restarted < 5
            stats = pub.stats()
            assert stats["reconnects"] == 1
        finally:
            pub.close()
            for member in members:
                member.close()
    lost = [r for r in caplog.records if "lost NATS" in r.getMessage()]
    assert len(lost) == 3, "connection loss is logged once per connection"


def test_large_plain_frames_keep_flowing_across_a_server_restart(unique_topic: str) -> None:
    """Frames written straight to the socket while it dies: the publisher carries on
    by itself and whole frames arrive again afterwards (none corrupted)."""
    with NatsServer(jetstream=False, max_payload=8 * MiB) as server:
        sub = NATSPubSub(get_nats_config(env=server.env()))
        pub = NATSPubSub(get_nats_config(env=server.env()))
        stop = threading.Event()
        errors: list[BaseException] = []

        def camera() -> None:
            seq = 0
            while not stop.is_set():
                try:
                    pub.publish(unique_topic, b"%08d" % seq + frame(2 * MiB, seq % 7)[8:])
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                    return
                seq += 1
                time.sleep(0.02)

        try:
            sub.subscribe(unique_topic)
            thread = threading.Thread(target=camera)
            thread.start()
            assert collect(sub, 5, 10), "no frames before the restart"
            server.kill()
            time.sleep(0.3)
            server.restart()
            restarted = time.monotonic()
            after: list[bytes] = []
            while len(after) < 10 and time.monotonic() - restarted < 15:
                after += [m.data for m in collect(sub, 1, 0.5)]
            stop.set()
            thread.join(10)
            assert not errors
            assert len(after) >= 10, "frames did not resume after the restart"
            for data in after:
                seq = int(data[:8])
                assert data == b"%08d" % seq + frame(2 * MiB, seq % 7)[8:]
            assert pub.stats()["reconnects"] == 1
        finally:
            stop.set()
            pub.close()
            sub.close()


def test_publish_during_outage_is_bounded_and_typed(unique_topic: str) -> None:
    from msight_core.errors import BackpressureError

    with NatsServer(jetstream=False) as server:
        env = {
            **server.env(),
            "MSIGHT_PUBLISH_BUFFER_BYTES": "100000",
            "MSIGHT_PUBLISH_TIMEOUT": "1",
        }
        pub = NATSPubSub(get_nats_config(env=env))
        try:
            pub.publish(unique_topic, b"x")
            pub.flush()
            server.kill()
            time.sleep(0.3)
            started = time.monotonic()
            with pytest.raises(BackpressureError):
                for _ in range(1000):
                    pub.publish(unique_topic, b"y" * 1000)
            assert time.monotonic() - started < 5
            with pytest.raises(BackpressureError):
                pub.flush(0.5)
        finally:
            started = time.monotonic()
            pub.close()
            assert time.monotonic() - started < 15


def test_jetstream_no_loss_across_restart_and_group_resume(unique_topic: str) -> None:
    with NatsServer(jetstream=True) as server:
        # After a SIGKILL the server may restore messages as still "delivered" (the
        # NAKs sent on close can be lost with it): they come back after ack_wait.
        env = {**server.env(), "MSIGHT_NATS_JETSTREAM": "true", "MSIGHT_NATS_ACK_WAIT": "3"}
        pub = NATSPubSub(get_nats_config(env=env))
        sub = NATSPubSub(get_nats_config("resume", env=env))
        assert type(sub) is NATSPubSub and sub.capabilities.persistent
        try:
            sub.subscribe(unique_topic)
            sent = [b"js-%d" % i for i in range(300)]
            for payload in sent[:100]:
                pub.publish(unique_topic, payload)
            pub.flush()
            first = [m.data for m in collect(sub, 50, 10)]
            assert first == sent[:50]
            sub.close()  # acks the 50 taken (the 50th on close)
            server.kill()
            server.restart()
            for payload in sent[100:]:
                pub.publish(unique_topic, payload)
            pub.flush(20)
            sub = NATSPubSub(get_nats_config("resume", env=env))
            sub.subscribe(unique_topic)
            rest: list[bytes] = []
            deadline = time.monotonic() + 20
            while not set(sent[50:]) <= set(rest) and time.monotonic() < deadline:
                rest += [m.data for m in collect(sub, 1, 1)]
            assert set(sent[50:]) <= set(rest), "nothing accepted after the restart is lost"
            # A SIGKILL may lose the server's record of the last acks: those (and only
            # those) messages may come again.
            assert set(rest) <= set(sent[:50]) | set(sent[50:])
            assert len(rest) == len(set(rest)) or set(rest) - set(sent[50:]) <= set(sent[:50])
        finally:
            pub.close()
            sub.close()


def test_jetstream_unacked_message_is_redelivered(unique_topic: str, nats_server: Any) -> None:
    env = {**nats_server.env(), "MSIGHT_NATS_JETSTREAM": "true", "MSIGHT_NATS_ACK_WAIT": "1"}
    pub = NATSPubSub(get_nats_config(env=env))
    first = NATSPubSub(get_nats_config("redeliver", env=env))
    try:
        first.subscribe(unique_topic)
        pub.publish(unique_topic, b"only")
        pub.flush()
        assert [m.data for m in collect(first, 1, 10)] == [b"only"]
        # The application crashes while processing: the message is not acknowledged.
        with pytest.raises(ZeroDivisionError), first:
            raise ZeroDivisionError
        second = NATSPubSub(get_nats_config("redeliver", env=env))
        second.subscribe(unique_topic)
        assert [m.data for m in collect(second, 1, 10)] == [b"only"]
        second.close()
    finally:
        pub.close()
        first.close()


def _stream_admin(url: str, action: Any) -> Any:
    async def run() -> Any:
        nc = await nats.connect(url)
        try:
            return await action(nc.jsm())
        finally:
            await nc.close()

    return asyncio.run(run())


def test_jetstream_briefly_unavailable_publishes_are_sent_again(
    make: Any, unique_topic: str, nats_server: Any
) -> None:
    """While no stream answers (a replicated stream electing a leader, say), the
    server replies 503: those publishes are held and sent again, not failed."""
    env = {"MSIGHT_NATS_JETSTREAM": "true", "MSIGHT_PUBLISH_TIMEOUT": "20"}
    pub = make(**env)
    pub.publish(unique_topic, b"before")
    pub.flush()
    name = _stream_admin(nats_server.url, lambda jsm: jsm.find_stream_name_by_subject(unique_topic))
    config = _stream_admin(nats_server.url, lambda jsm: jsm.stream_info(name)).config
    _stream_admin(nats_server.url, lambda jsm: jsm.delete_stream(name))
    for i in range(20):
        pub.publish(unique_topic, b"during-%d" % i)
    time.sleep(1.0)  # several 503 replies and retries
    assert pub.stats()["publish_retried"] > 0
    _stream_admin(nats_server.url, lambda jsm: jsm.add_stream(config))
    pub.flush(15)
    stats = pub.stats()
    assert stats["publish_failed"] == 0 and stats["unacknowledged"] == 0
    info = _stream_admin(nats_server.url, lambda jsm: jsm.stream_info(name))
    assert info.state.messages == 20  # each once: retries are de-duplicated by message id
    reader = make("unavailable-reader", **env)
    reader.subscribe(unique_topic)
    got = [m.data for m in collect(reader, 20, 10)]
    assert got == [b"during-%d" % i for i in range(20)]


def test_jetstream_unavailable_past_the_publish_timeout_is_an_error(
    make: Any, unique_topic: str, nats_server: Any
) -> None:
    env = {"MSIGHT_NATS_JETSTREAM": "true", "MSIGHT_PUBLISH_TIMEOUT": "1.5"}
    pub = make(**env)
    pub.publish(unique_topic, b"before")
    pub.flush()
    name = _stream_admin(nats_server.url, lambda jsm: jsm.find_stream_name_by_subject(unique_topic))
    _stream_admin(nats_server.url, lambda jsm: jsm.delete_stream(name))
    pub.publish(unique_topic, b"lost")
    started = time.monotonic()
    with pytest.raises(PublishError, match="no stream answered for 1.5s"):
        pub.flush(10)
    assert 1.2 < time.monotonic() - started < 6
    assert pub.stats()["publish_failed"] == 1


def test_jetstream_group_hand_over_after_close_is_immediate(make: Any, unique_topic: str) -> None:
    """close() withdraws the member's interest before it returns: what is published
    next waits for the next member instead of going to the closed inbox (where it
    would sit out the 60 s ack_wait). Repeated because the old race hit ~1 in 100."""
    env = {"MSIGHT_NATS_JETSTREAM": "true", "MSIGHT_NATS_ACK_WAIT": "60"}
    pub = make(**env)
    for round_ in range(25):
        topic = f"{unique_topic}.r{round_}"
        first = make(f"hand-{round_}", **env)
        first.subscribe(topic)
        pub.publish(topic, b"first")
        pub.flush()
        assert [m.data for m in collect(first, 1, 10)] == [b"first"]
        first.close()
        sent = [b"kept-%d" % i for i in range(10)]
        for payload in sent:
            pub.publish(topic, payload)
        pub.flush()
        second = make(f"hand-{round_}", **env)
        second.subscribe(topic)
        assert sorted(m.data for m in collect(second, len(sent), 5)) == sorted(sent), round_
        second.close()


# -- authentication -----------------------------------------------------------------


def test_user_password_auth() -> None:
    with NatsServer(jetstream=False, user="alice", password="s3cr3t-pw-xyz") as server:
        backend = NATSPubSub(get_nats_config(env=server.env()))
        try:
            backend.subscribe("auth.ok")
            backend.publish("auth.ok", b"hi")
            backend.flush()
            assert [m.data for m in collect(backend, 1, 5)] == [b"hi"]
            assert "s3cr3t" not in repr(backend)
        finally:
            backend.close()
        bad = {**server.env(), "MSIGHT_NATS_PASSWORD": "wrong-pw-123"}
        wrong = NATSPubSub(get_nats_config(env=bad))
        started = time.monotonic()
        with pytest.raises(AuthenticationError) as info:
            wrong.publish("auth.ok", b"x")
        assert time.monotonic() - started < 10
        assert "wrong-pw-123" not in str(info.value)
        wrong.close()


def test_token_auth() -> None:
    with NatsServer(jetstream=False, token="tok-abc-123456") as server:
        backend = NATSPubSub(get_nats_config(env=server.env()))
        try:
            backend.subscribe("auth.tok")
            backend.publish("auth.tok", b"hi")
            backend.flush()
            assert [m.data for m in collect(backend, 1, 5)] == [b"hi"]
        finally:
            backend.close()
        wrong = NATSPubSub(get_nats_config(env={**server.env(), "MSIGHT_NATS_TOKEN": "nope"}))
        with pytest.raises(AuthenticationError):
            wrong.subscribe("auth.tok")
        wrong.close()


def test_unreachable_server_is_a_typed_error() -> None:
    from msight_core.testing.brokers import free_port

    env = {
        "MSIGHT_NATS_SERVERS": f"['nats://127.0.0.1:{free_port()}']",
        "MSIGHT_NATS_CONNECT_TIMEOUT": "1",
    }
    backend = NATSPubSub(get_nats_config(env=env))
    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError):
        backend.subscribe("nowhere")
    assert time.monotonic() - started < 10
    backend.close()


def test_wildcard_subscription_gets_large_frames_and_raw_publishers(
    make: Any, nats_server: NatsServer, unique_topic: str
) -> None:
    """A pattern is NATS's own subject syntax: frames above max_payload (the
    large-frame path) and a raw nats-py publisher's messages arrive with their topic."""
    sub = make()
    sub.subscribe(f"{unique_topic}.*")
    pub = make()
    big = frame(3 * MiB, 5)
    pub.publish(f"{unique_topic}.front", big)
    pub.flush(30)

    async def raw() -> None:
        nc = await nats.connect(nats_server.url)
        await nc.publish(f"{unique_topic}.rear", b"raw")
        await nc.publish(f"{unique_topic}.rear.deep", b"not matched")
        await nc.flush()
        await nc.close()

    asyncio.run(raw())
    got = {m.topic: m.data for m in collect(sub, 2, 30)}
    assert got == {f"{unique_topic}.front": big, f"{unique_topic}.rear": b"raw"}
    assert sub.receive(0.5) is None
    jetstream = make(MSIGHT_NATS_JETSTREAM="true")
    with pytest.raises(InvalidTopicError, match="wildcard"):
        jetstream.subscribe(f"{unique_topic}.*")
