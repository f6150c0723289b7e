"""The NATS backend's protocol parser (``_nats.parser``) on real nats-server connections.

The end-to-end tests send through a plain nats-py client and read through
``NATSPubSub``, whose subscriptions use the parser's direct route. The split
tests feed recorded protocol bytes, cut at every offset, to a parser bound to a
live nats-py client, so what is not routed goes through nats-py's own
processing for real.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import nats
import pytest

from msight_core.pubsub import NATSPubSub
from msight_core.pubsub._nats import internals
from msight_core.pubsub._nats.parser import FastParser
from msight_core.pubsub.utils import get_nats_config
from msight_core.testing.brokers import NatsServer
from msight_core.testing.conformance import collect


def _sizes(rng: random.Random, count: int) -> list[int]:
    # Mostly small, some spanning nats-py's 32 KB reads, a few near 1 MB.
    choices = [0, 1, 2, 7, 100, 1024, 4096, 32 * 1024 - 30, 32 * 1024 + 5, 200_000, 1_000_000]
    return [
        rng.choice(choices) if rng.random() < 0.5 else rng.randrange(0, 3000) for _ in range(count)
    ]


def test_mixed_stream_from_a_plain_client_arrives_exact_and_in_order(
    nats_server: NatsServer, unique_topic: str
) -> None:
    """Plain messages, messages with headers and with reply subjects, of sizes that
    straddle every read boundary, interleaved with PINGs: all in publish order."""
    rng = random.Random(7)
    payloads = [rng.randbytes(size) for size in _sizes(rng, 1500)]
    sub = NATSPubSub(get_nats_config(env=nats_server.env()))
    sub.subscribe(unique_topic)

    async def send() -> None:
        nc = await nats.connect(nats_server.url)
        for index, payload in enumerate(payloads):
            if index % 7 == 3:
                await nc.publish(unique_topic, payload, headers={"X-Index": str(index)})
            elif index % 5 == 1:
                await nc.publish(unique_topic, payload, reply=f"_INBOX.reply.{index}")
            else:
                await nc.publish(unique_topic, payload)
            if index % 100 == 0:
                await nc.flush()
        await nc.flush()
        await nc.close()

    try:
        asyncio.run(send())
        got = collect(sub, len(payloads), 30)
        assert [len(m.data) for m in got] == [len(p) for p in payloads]
        assert [m.data for m in got] == payloads
        assert {m.topic for m in got} == {unique_topic}
        assert sub.stats()["slow_consumer_drops"] == 0
    finally:
        sub.close()


def test_several_topics_on_one_subscriber_keep_their_names_and_order(
    nats_server: NatsServer, unique_topic: str
) -> None:
    topics = [f"{unique_topic}.s{i}" for i in range(9)]
    sub = NATSPubSub(get_nats_config(env=nats_server.env()))
    for topic in topics:
        sub.subscribe(topic)
    pub = NATSPubSub(get_nats_config(env=nats_server.env()))
    try:
        sent = [(topics[i % 9], b"%d" % i) for i in range(300)]
        for topic, payload in sent:
            pub.publish(topic, payload)
        pub.flush()
        got = collect(sub, len(sent), 15)
        assert [(m.topic, m.data) for m in got] == sent
    finally:
        pub.close()
        sub.close()


class _Recorder:
    """A live nats-py client with one subscription, and a spare FastParser bound to
    it that the tests feed by hand (the client's own parser keeps reading the
    socket, which stays quiet: nothing is published to the test subjects)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.events: list[tuple[str, str, bytes]] = []

    async def start(self) -> None:
        self.nc = await nats.connect(self.url)

        async def on_msg(msg: Any) -> None:
            self.events.append(("nats-py", msg.subject, msg.data))
            route = self.parser.routes.get(msg.sid)
            if route is not None:
                route.done()

        self.sub = await self.nc.subscribe("parse.test.>", cb=on_msg)
        self.other = await self.nc.subscribe("parse.other", cb=on_msg)
        hooks = internals.client_hooks(self.nc)
        assert hooks is not None
        self.parser = FastParser(hooks)

        def direct(subject: str, data: bytes, reply: bytes, headers: bytes | None) -> None:
            self.events.append(("direct", subject, data))
            self.replies.append(reply)

        self.replies: list[bytes] = []
        self.parser.route(self.sub._id, direct, marker=b"Mark:")

    async def settle(self) -> None:
        for _ in range(20):  # let nats-py's subscription tasks run their callbacks
            await asyncio.sleep(0)

    async def stop(self) -> None:
        await self.nc.close()


def _wire(sid: int, other: int) -> tuple[bytes, list[tuple[str, str, bytes]]]:
    """Protocol bytes as a server sends them, and what each message must become."""
    out: list[bytes] = []
    expect: list[tuple[str, str, bytes]] = []

    def msg(subject: str, payload: bytes, s: int = sid, reply: str = "") -> None:
        line = f"MSG {subject} {s} {reply + ' ' if reply else ''}{len(payload)}\r\n".encode()
        out.append(line + payload + b"\r\n")

    def hmsg(subject: str, headers: bytes, payload: bytes) -> None:
        total = len(headers) + len(payload)
        out.append(f"HMSG {subject} {sid} {len(headers)} {total}\r\n".encode())
        out.append(headers + payload + b"\r\n")

    msg("parse.test.a", b"hello")
    expect.append(("direct", "parse.test.a", b"hello"))
    msg("parse.test.b", b"")
    expect.append(("direct", "parse.test.b", b""))
    out.append(b"+OK\r\n")
    msg("parse.test.c", b"MSG x 1 3\r\nabc\r\n", reply="_INBOX.r")
    expect.append(("direct", "parse.test.c", b"MSG x 1 3\r\nabc\r\n"))
    out.append(b"PONG\r\n")  # unsolicited: nats-py ignores it without a waiting PING
    msg("parse.other", b"not routed", s=other)
    expect.append(("nats-py", "parse.other", b"not routed"))
    # Headers the receiver ignores (a JetStream message id): delivered directly.
    hmsg("parse.test.h", b"NATS/1.0\r\nNats-Msg-Id: 7\r\n\r\n", b"with header")
    expect.append(("direct", "parse.test.h", b"with header"))
    # A status line (heartbeat, flow control, error) is for nats-py.
    hmsg("parse.test.s", b"NATS/1.0 100 Idle Heartbeat\r\n\r\n", b"")
    expect.append(("nats-py", "parse.test.s", b""))
    # Right after a message that took nats-py's path, the route waits for it.
    msg("parse.test.d", b"after status")
    expect.append(("nats-py", "parse.test.d", b"after status"))
    msg("parse.test.e", bytes(range(256)) * 300)
    expect.append(("nats-py", "parse.test.e", bytes(range(256)) * 300))
    return b"".join(out), expect


def _feed(pieces: list[bytes], url: str) -> list[tuple[str, str, bytes]]:
    async def run() -> list[tuple[str, str, bytes]]:
        rec = _Recorder(url)
        await rec.start()
        try:
            for piece in pieces:
                await rec.parser.parse(piece)
            await rec.settle()
            return rec.events
        finally:
            await rec.stop()

    return _per_subscription(asyncio.run(run()))


def _per_subscription(events: list[tuple[str, str, bytes]]) -> list[tuple[str, str, bytes]]:
    """Order matters within a subscription; nats-py runs each one in its own task."""
    return sorted(events, key=lambda event: event[1] == "parse.other")  # stable


def test_split_at_every_offset_gives_the_same_messages(nats_server: NatsServer) -> None:
    async def sids() -> tuple[int, int]:
        rec = _Recorder(nats_server.url)
        await rec.start()
        await rec.stop()
        return rec.sub._id, rec.other._id

    sid, other = asyncio.run(sids())
    wire, expect = _wire(sid, other)
    expect = _per_subscription(expect)
    # The whole stream in one read, then every two-piece cut of its first 300 bytes
    # (all the control lines and small messages) and a sample of later cuts.
    cuts = list(range(1, 300)) + list(range(300, len(wire), 997))
    assert _feed([wire], nats_server.url) == expect
    for cut in cuts:
        assert _feed([wire[:cut], wire[cut:]], nats_server.url) == expect, cut
    assert _feed([wire[i : i + 1] for i in range(len(wire))], nats_server.url) == expect


def test_routed_subscription_returns_to_direct_after_headers(nats_server: NatsServer) -> None:
    async def run() -> list[tuple[str, str, bytes]]:
        rec = _Recorder(nats_server.url)
        await rec.start()
        try:
            sid = rec.sub._id
            header = b"NATS/1.0\r\nMark: frame-1\r\n\r\n"  # the route's marker
            await rec.parser.parse(
                f"HMSG parse.test.h {sid} {len(header)} {len(header) + 1}\r\n".encode()
                + header
                + b"h\r\n"
            )
            await rec.settle()  # the callback handled it: the route is free again
            await rec.parser.parse(f"MSG parse.test.p {sid} 1\r\np\r\n".encode())
            return rec.events
        finally:
            await rec.stop()

    assert asyncio.run(run()) == [
        ("nats-py", "parse.test.h", b"h"),
        ("direct", "parse.test.p", b"p"),
    ]


def test_direct_route_passes_the_reply_subject(nats_server: NatsServer) -> None:
    """JetStream deliveries are acknowledged on their reply subject."""

    async def run() -> list[bytes]:
        rec = _Recorder(nats_server.url)
        await rec.start()
        try:
            sid = rec.sub._id
            header = b"NATS/1.0\r\nNats-Msg-Id: 1\r\n\r\n"
            await rec.parser.parse(
                f"MSG parse.test.a {sid} $JS.ACK.s.c.1.1.1.1.0 1\r\na\r\n".encode()
                + f"MSG parse.test.b {sid} 1\r\nb\r\n".encode()
                + f"HMSG parse.test.c {sid} $JS.ACK.s.c.1.2.2.1.0 {len(header)} "
                f"{len(header) + 1}\r\n".encode()
                + header
                + b"c\r\n"
            )
            assert [e[2] for e in rec.events] == [b"a", b"b", b"c"]
            return rec.replies
        finally:
            await rec.stop()

    assert asyncio.run(run()) == [b"$JS.ACK.s.c.1.1.1.1.0", b"", b"$JS.ACK.s.c.1.2.2.1.0"]


def test_malformed_message_line_is_a_protocol_error(nats_server: NatsServer) -> None:
    async def run() -> None:
        rec = _Recorder(nats_server.url)
        await rec.start()
        try:
            await rec.parser.parse(b"MSG parse.test.a notanumber\r\n")
        finally:
            await rec.stop()

    with pytest.raises(nats.errors.ProtocolError):
        asyncio.run(run())


def test_install_only_replaces_the_stock_parser() -> None:
    client = nats.aio.client.Client()
    parser = internals.install_parser(client, FastParser)
    assert isinstance(parser, FastParser) and client._ps is parser
    # Not nats-py's own parser any more: left alone.
    assert internals.install_parser(client, FastParser) is None


def test_forced_public_path_installs_no_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(internals, "FORCE_PUBLIC", True)
    client = nats.aio.client.Client()
    assert internals.install_parser(client, FastParser) is None
    assert type(client._ps) is not FastParser


def test_without_the_fast_parser_the_backend_still_works(
    nats_server: NatsServer, unique_topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What runs when nats-py's internals differ from what the parser expects."""
    monkeypatch.setattr(internals, "install_parser", lambda nc, make: None)
    sub = NATSPubSub(get_nats_config(env=nats_server.env()))
    pub = NATSPubSub(get_nats_config(env=nats_server.env()))
    try:
        sub.subscribe(unique_topic)
        assert type(sub._conn.client._ps) is not FastParser
        sent = [b"%d" % i for i in range(1000)] + [bytes(3 * 1024 * 1024)]
        for payload in sent:
            pub.publish(unique_topic, payload)
        pub.flush()
        assert [m.data for m in collect(sub, len(sent), 30)] == sent
    finally:
        pub.close()
        sub.close()


def test_without_the_direct_read_the_parser_reads_through_nats_py(
    nats_server: NatsServer, unique_topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast parser on nats-py's 32 KB reads: what runs when the connection is not
    the TCP transport the direct read expects."""
    monkeypatch.setattr(internals, "_take_over_reading", lambda nc, parser: None)
    sub = NATSPubSub(get_nats_config(env=nats_server.env()))
    pub = NATSPubSub(get_nats_config(env=nats_server.env()))
    try:
        sub.subscribe(unique_topic)
        parser = sub._conn.client._ps
        assert type(parser) is FastParser
        sent = [b"%d" % i for i in range(1000)] + [bytes(512 * 1024), b"end"]
        for payload in sent:
            pub.publish(unique_topic, payload)
        pub.flush()
        assert [m.data for m in collect(sub, len(sent), 30)] == sent
        assert parser.frame_head is None and not parser.frame  # no frame buffer on this path
    finally:
        pub.close()
        sub.close()


def test_the_direct_read_takes_large_payloads_into_one_reused_buffer(
    nats_server: NatsServer, unique_topic: str
) -> None:
    sub = NATSPubSub(get_nats_config(env=nats_server.env()))
    pub = NATSPubSub(get_nats_config(env=nats_server.env()))
    try:
        sub.subscribe(unique_topic)
        sent = []
        for i in range(40):
            sent += [bytes([i]) * (1024 * 1024 - i), b"small-%d" % i]
        for payload in sent:
            pub.publish(unique_topic, payload)
        pub.flush()
        assert [m.data for m in collect(sub, len(sent), 30)] == sent
        parser = sub._conn.client._ps
        assert len(parser.frame) == 1024 * 1024 + 2  # one buffer, the largest payload's size
        assert len(parser.buf) <= 8 * 1024 * 1024
    finally:
        pub.close()
        sub.close()
