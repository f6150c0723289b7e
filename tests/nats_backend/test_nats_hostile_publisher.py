"""A hostile publisher against msight NATS subscribers, on real nats-server processes.

The attacker is a raw nats-py client (or a raw socket) that can publish to the
topic: forged large-frame notices, headers and reply subjects nats-py cannot
parse. Each forged message costs that message only (a counted loss or drop):
the subscriber keeps reading, the next message arrives promptly, nothing is
allocated for a frame that never comes, no stream but msight's own is read, no
wildcard is subscribed, and in JetStream mode the forged notice is terminated,
not redelivered.

Also here: a JetStream publisher's unacknowledged messages count against
``MSIGHT_PUBLISH_BUFFER_BYTES``, and ``MSIGHT_QUEUE_OVERFLOW=block`` waits for
queue room without stalling the instance's event loop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import nats
import pytest

from msight_core.errors import BackpressureError
from msight_core.pubsub import NATSPubSub
from msight_core.pubsub.utils import get_nats_config
from msight_core.testing.brokers import NatsServer
from msight_core.testing.conformance import collect

MiB = 1024 * 1024


@pytest.fixture
def make(nats_server: NatsServer) -> Iterator[Any]:
    made: list[NATSPubSub] = []

    def build(group_id: str | None = None, server: NatsServer | None = None, **env: str) -> Any:
        backend = NATSPubSub(
            get_nats_config(group_id, env={**(server or nats_server).env(), **env})
        )
        made.append(backend)
        return backend

    yield build
    for backend in made:
        backend.close()


def forge(url: str, topic: str, notices: list[dict[str, str]], between: bool = True) -> None:
    """Publish each notice (headers, empty payload), each followed by ``after-<i>``."""

    async def run() -> None:
        nc = await nats.connect(url)
        for i, headers in enumerate(notices):
            await nc.publish(topic, b"", headers=headers)
            if between:
                await nc.publish(topic, b"after-%d" % i)
        await nc.flush()
        await nc.close()

    asyncio.run(run())


def notice(frame_id: str = "nosuchframe1", size: str = "4000000", chunks: str = "4", **more: str):
    headers = {
        "Msight-Frame": frame_id,
        "Msight-Frame-Size": size,
        "Msight-Frame-Chunks": chunks,
        "Msight-Frame-Stream": "MSIGHT_LARGE_FRAMES",
    }
    headers.update(more)
    return headers


def _ensure_large_stream(make: Any, topic: str) -> None:
    """A real large frame first: the chunk stream exists, as on a server in use."""
    sub, pub = make(), make()
    sub.subscribe(topic + ".warm")
    pub.publish(topic + ".warm", b"w" * (2 * MiB))
    pub.flush()
    assert [len(m.data) for m in collect(sub, 1, 20)] == [2 * MiB]


# -- forged large-frame notices ---------------------------------------------------------

BAD_NOTICES = {
    "size-minus-1": notice(size="-1"),
    "size-not-a-number": notice(size="abc"),
    "size-5000-digits": notice(size="9" * 5000),
    "size-above-the-store": notice(size=str(4 * 1024 * MiB), chunks="5000"),
    "no-chunks": notice(chunks="0"),
    "more-chunks-than-bytes": notice(size="1000", chunks="1000"),
    "fewer-chunks-than-max-payload-allows": notice(size=str(8 * MiB), chunks="1"),
    "id-wildcard-gt": notice(frame_id=">"),
    "id-wildcard-star": notice(frame_id="*"),
    "id-with-dots": notice(frame_id="a.b"),
    "id-empty": notice(frame_id=""),
    "another-stream": notice(**{"Msight-Frame-Stream": "KV_secrets"}),
    "size-missing": {"Msight-Frame": "x", "Msight-Frame-Chunks": "1"},
}


def test_forged_notices_cost_only_themselves(
    make: Any, nats_server: NatsServer, unique_topic: str
) -> None:
    _ensure_large_stream(make, unique_topic)
    sub = make()
    sub.subscribe(unique_topic)
    started = time.monotonic()
    forge(nats_server.url, unique_topic, list(BAD_NOTICES.values()))
    got = collect(sub, len(BAD_NOTICES), 20)
    elapsed = time.monotonic() - started
    assert [m.data for m in got] == [b"after-%d" % i for i in range(len(BAD_NOTICES))]
    deadline = time.monotonic() + 5
    while sub.stats()["large_frames_lost"] < len(BAD_NOTICES) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sub.stats()["large_frames_lost"] == len(BAD_NOTICES)
    # Malformed notices are refused on sight: no wait for chunks at all.
    assert elapsed < 5, f"{len(BAD_NOTICES)} malformed notices took {elapsed:.1f}s"


def test_a_notice_for_a_frame_that_never_comes_stalls_briefly_and_allocates_nothing(
    make: Any, nats_server: NatsServer, unique_topic: str
) -> None:
    """The publish timeout is 10 s by default: a forged notice must not hold the
    subscription's next message that long, nor allocate the announced 200 MiB."""
    _ensure_large_stream(make, unique_topic)
    sub = make()
    sub.subscribe(unique_topic)
    forged = [
        notice(frame_id="nosuchframe1", size=str(200 * MiB), chunks="200"),
        notice(frame_id="nosuchframe2", size="209715200", chunks="201"),
    ]
    tracemalloc.start()
    try:
        started = time.monotonic()
        forge(nats_server.url, unique_topic, forged)
        got = collect(sub, 2, 20)
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [m.data for m in got] == [b"after-0", b"after-1"]
    assert sub.stats()["large_frames_lost"] == 2
    assert elapsed < 3, f"two forged notices held the subscription {elapsed:.1f}s"
    assert peak < 32 * MiB, f"{peak / MiB:.0f} MiB allocated for frames that never came"


def test_a_notice_may_name_only_msights_own_stream() -> None:
    """A notice naming another stream must not make the subscriber read it (and
    hand its contents to the application as a frame)."""

    async def plant(url: str) -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.add_stream(name="VICTIM", subjects=["_msight.large.victim"])
        await js.publish("_msight.large.victim", b"secret")
        await nc.close()

    with NatsServer(jetstream=True) as server:
        asyncio.run(plant(server.url))
        sub = NATSPubSub(get_nats_config(env=server.env()))
        try:
            sub.subscribe("t.victim")
            forge(
                server.url,
                "t.victim",
                [
                    notice(
                        frame_id="victim", size="6", chunks="1", **{"Msight-Frame-Stream": "VICTIM"}
                    )
                ],
            )
            got = collect(sub, 1, 10)
            assert [m.data for m in got] == [b"after-0"]
            assert sub.stats()["large_frames_lost"] == 1
        finally:
            sub.close()


def test_jetstream_forged_notice_is_terminated_not_redelivered(unique_topic: str) -> None:
    with NatsServer(jetstream=True) as server:
        env = {**server.env(), "MSIGHT_NATS_JETSTREAM": "true", "MSIGHT_NATS_ACK_WAIT": "1"}
        sub = NATSPubSub(get_nats_config("grp", env=env))
        try:
            sub.subscribe(unique_topic)  # creates the topic's stream
            started = time.monotonic()
            forge(server.url, unique_topic, [notice(size="-1"), notice(frame_id="gone1")])
            got = collect(sub, 2, 15)
            assert [m.data for m in got] == [b"after-0", b"after-1"]
            assert time.monotonic() - started < 5
            assert sub.receive(0.2) is None  # acknowledges what was taken
            time.sleep(3)  # three ack waits: a redelivered notice would be counted again
            assert sub.receive(0.2) is None
            assert sub.stats()["large_frames_lost"] == 2

            async def consumer_state() -> Any:
                nc = await nats.connect(server.url)
                jsm = nc.jsm()
                stream = await jsm.find_stream_name_by_subject(unique_topic)
                info = await jsm.consumer_info(stream, "grp")
                await nc.close()
                return info

            info = asyncio.run(consumer_state())
            assert info.num_redelivered == 0
            assert info.num_ack_pending <= 1  # at most the message in hand
        finally:
            sub.close()


# -- headers and names nats-py cannot parse -----------------------------------------------


def test_headers_and_reply_subjects_nats_py_cannot_parse_cost_one_message(
    make: Any, nats_server: NatsServer, unique_topic: str
) -> None:
    """Before: the UnicodeDecodeError / IndexError escaped into nats-py's read loop,
    which stopped for good: the subscriber received nothing more, ever."""
    sub = make()
    sub.subscribe(unique_topic)
    topic = unique_topic.encode()
    raw = socket.create_connection((nats_server.host, nats_server.port))
    try:
        raw.recv(65536)
        raw.sendall(b'CONNECT {"verbose":false,"headers":true,"protocol":1}\r\n')
        notice_hdr = b"NATS/1.0\r\nMsight-Frame: x\r\n\r\n"
        raw.sendall(
            b"HPUB %s \xff\xfe %d %d\r\n%s\r\n"
            % (topic, len(notice_hdr), len(notice_hdr), notice_hdr)
        )
        raw.sendall(b"HPUB %s 2 5\r\nNAxyz\r\n" % topic)  # a header block nats-py indexes past
        raw.sendall(b"PUB %s 5\r\nafter\r\nPING\r\n" % topic)
        got = collect(sub, 1, 10)
        assert [m.data for m in got] == [b"after"]
        assert sub.stats()["malformed_dropped"] == 2
        assert sub.stats()["reconnects"] == 0
    finally:
        raw.close()


# -- JetStream mode: unacknowledged bytes count against the publish buffer ------------------


def test_jetstream_unacked_messages_count_against_the_publish_buffer(unique_topic: str) -> None:
    with NatsServer(jetstream=True) as server:
        env = {
            **server.env(),
            "MSIGHT_NATS_JETSTREAM": "true",
            "MSIGHT_PUBLISH_BUFFER_BYTES": str(1 * MiB),
            "MSIGHT_PUBLISH_TIMEOUT": "2",
        }
        pub = NATSPubSub(get_nats_config(env=env))
        try:
            pub.publish(unique_topic, b"first")  # connected, stream created
            pub.flush()
            assert server.process is not None
            os.kill(server.process.pid, signal.SIGSTOP)  # nothing is acknowledged now
            try:
                accepted = 0
                started = time.monotonic()
                with pytest.raises(BackpressureError) as info:
                    for _ in range(40):  # 4 MB: more than the socket buffers would take
                        pub.publish(unique_topic, b"x" * (100 * 1024))
                        accepted += 1
                waited = time.monotonic() - started
                assert accepted <= 11, f"{accepted} x 100 KB accepted with a 1 MiB bound"
                assert 1.5 < waited < 8, f"publish() gave up after {waited:.1f}s ({info.value})"
                assert "unacknowledged" in str(info.value)
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            pub.flush(15)  # what was accepted is stored once the server is back
            stats = pub.stats()
            assert (stats["publish_buffered"], stats["unacknowledged"]) == (0, 0), stats
        finally:
            pub.close()


# -- MSIGHT_QUEUE_OVERFLOW=block never waits on the event loop -----------------------------


def test_block_mode_waits_for_room_off_the_event_loop(
    nats_server: NatsServer, unique_topic: str
) -> None:
    """A consumer that does not read for 3 s: the same instance's publishes still go
    out at once, its PINGs are answered (flush), and nothing is dropped."""
    env = {
        **nats_server.env(),
        "MSIGHT_QUEUE_OVERFLOW": "block",
        "MSIGHT_QUEUE_MAX_MESSAGES": "5",
    }
    slow = NATSPubSub(get_nats_config(env=env))
    watcher = NATSPubSub(get_nats_config(env=nats_server.env()))
    try:
        slow.subscribe(unique_topic)
        watcher.subscribe(unique_topic + ".out")
        inbound = [b"in-%d" % i for i in range(200)]

        async def peer() -> None:
            nc = await nats.connect(nats_server.url)
            for payload in inbound:
                await nc.publish(unique_topic, payload)
            await nc.flush()
            await nc.close()

        asyncio.run(peer())  # the slow instance's queue is full after 5
        time.sleep(0.3)
        started = time.monotonic()
        for i in range(50):
            slow.publish(unique_topic + ".out", b"out-%d" % i)
        slow.flush(2)  # a PING answered while the queue is full
        out = collect(watcher, 50, 5)
        assert [m.data for m in out] == [b"out-%d" % i for i in range(50)]
        assert time.monotonic() - started < 3
        time.sleep(1)
        got = collect(slow, len(inbound), 10)
        assert [m.data for m in got] == inbound
        stats = slow.stats()
        assert stats["dropped"] == {} and stats["reconnects"] == 0
    finally:
        slow.close()
        watcher.close()


def test_block_mode_bounds_what_it_reads_ahead(nats_server: NatsServer, unique_topic: str) -> None:
    """More than the hand-off holds: reading pauses (TCP holds the rest), nothing
    is lost, and it all arrives in order once the consumer reads."""
    env = {
        **nats_server.env(),
        "MSIGHT_QUEUE_OVERFLOW": "block",
        "MSIGHT_QUEUE_MAX_MESSAGES": "10",
    }
    slow = NATSPubSub(get_nats_config(env=env))
    try:
        slow.subscribe(unique_topic)
        inbound = [b"%06d" % i + b"." * 200 for i in range(30_000)]

        async def peer() -> None:
            nc = await nats.connect(nats_server.url)
            for payload in inbound:
                await nc.publish(unique_topic, payload)
            await nc.flush()
            await nc.close()

        asyncio.run(peer())
        time.sleep(0.5)
        handoff = slow._subscriber._handoff  # the bound is the point of this test
        # The bound, plus at most one parser pass (1 MiB) past it.
        assert handoff is not None and handoff.messages <= 10_000 + 6000
        got = collect(slow, len(inbound), 30)
        assert [m.data for m in got] == inbound
        assert slow.stats()["dropped"] == {}
    finally:
        slow.close()
