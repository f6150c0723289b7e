"""The NATS parser against streams a server (or whoever sits in its place) should
never send: each is a ProtocolError (nats-py then drops the connection and
reconnects) or a counted drop of that one message, never another exception,
a stall, a buffer that grows without bound, or a truncated payload delivered.

Pure byte streams go to a FastParser with stub hooks; the cases that matter for
a running subscriber are also played from a fake server socket, where the
backend must come back on a new connection and deliver what follows.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from _fake_nats import FakeNats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.errors import ProtocolError

from msight_core.pubsub import NATSPubSub
from msight_core.pubsub._nats.parser import FastParser
from msight_core.pubsub.utils import get_nats_config

SID = 7


class StubHooks:
    """What the parser calls on nats-py, recorded."""

    def __init__(self, fail_msgs: bool = False) -> None:
        self.stats = {"in_msgs": 0, "in_bytes": 0}
        self.events: list[tuple[Any, ...]] = []
        self.fail_msgs = fail_msgs

    async def process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        if self.fail_msgs:
            subject.decode()  # as nats-py's _build_message does
            reply.decode()
        self.events.append(("msg", sid, subject, data))

    async def process_err(self, text: str) -> None:
        self.events.append(("err", text))

    async def process_ping(self) -> None:
        self.events.append(("ping",))

    async def process_pong(self) -> None:
        self.events.append(("pong",))

    async def process_info(self, info: dict[str, Any]) -> None:
        self.events.append(("info", info))


def parse(*pieces: bytes, fail_msgs: bool = False) -> tuple[FastParser, list[Any], list[bytes]]:
    """Feed ``pieces`` in order; the parser, the hooks' events, the routed payloads."""
    hooks = StubHooks(fail_msgs)
    parser = FastParser(hooks)
    delivered: list[bytes] = []
    parser.route(
        SID, lambda subject, data, reply, headers: delivered.append(data), b"Msight-Frame:"
    )

    async def run() -> None:
        for piece in pieces:
            await parser.parse(piece)

    asyncio.run(run())
    return parser, hooks.events, delivered


def protocol_error(*pieces: bytes) -> list[bytes]:
    delivered: list[bytes] = []
    hooks = StubHooks()
    parser = FastParser(hooks)
    parser.route(SID, lambda subject, data, reply, headers: delivered.append(data))

    async def run() -> None:
        for piece in pieces:
            await parser.parse(piece)

    with pytest.raises(ProtocolError):
        asyncio.run(run())
    return delivered


def test_a_5000_digit_sid_is_a_protocol_error_not_a_value_error() -> None:
    protocol_error(b"MSG cam " + b"1" * 5000 + b" 3\r\nabc\r\n")
    protocol_error(b"MSG cam " + b"1" * 300 + b" 3\r\nabc\r\n")  # a line of normal length


def test_a_size_beyond_any_server_is_refused_before_buffering() -> None:
    protocol_error(b"MSG cam 7 99999999999\r\n")
    protocol_error(b"MSG cam 7 " + b"9" * 40 + b"\r\n")
    protocol_error(b"HMSG cam 7 10 5\r\n0123456789\r\n")  # headers larger than the message


def test_info_that_is_not_json_or_not_utf8_is_a_protocol_error() -> None:
    protocol_error(b"INFO {not json}\r\n")
    protocol_error(b'INFO {"a": "\xff\xfe"}\r\n')
    protocol_error(b"INFO [1, 2]\r\n")


def test_err_text_that_is_not_utf8_is_passed_on_replaced() -> None:
    _, events, _ = parse(b"-ERR 'bad \xff'\r\nMSG cam 7 2\r\nok\r\n")
    assert events == [("err", "'bad \ufffd'")]


def test_an_unknown_line_followed_by_more_than_4kb_does_not_stall() -> None:
    protocol_error(b"XYZZY\r\n" + b"A" * 5000)
    protocol_error(b"XYZZY\r\n")
    protocol_error(b"XYZZY " + b"A" * 5000)  # no line end at all, in one read
    protocol_error(*[b"XYZZY "] + [b"A" * 1000] * 5)  # ... or over several


def test_a_payload_must_end_in_crlf() -> None:
    assert protocol_error(b"MSG cam 7 3\r\nhello\r\n") == []
    assert protocol_error(b"MSG cam 7 3\r\nhel", b"lo\r\n") == []
    assert protocol_error(b"MSG cam 8 3\r\nhello\r\n") == []  # not routed: the same


def test_a_message_nats_py_cannot_take_is_dropped_and_the_next_one_arrives() -> None:
    hdr = b"NATS/1.0\r\nMsight-Frame: x\r\n\r\n"
    wire = (
        b"HMSG cam 7 \xff\xfe %d %d\r\n%s\r\n" % (len(hdr), len(hdr), hdr)
        + b"MSG cam 7 5\r\nafter\r\n"
    )
    parser, _, delivered = parse(wire, fail_msgs=True)
    assert parser.dropped == 1
    assert delivered == [b"after"]
    assert parser.routes[SID].busy == 0  # the route is not left waiting for it


def test_a_subject_that_is_not_utf8_is_dropped_on_the_direct_route() -> None:
    parser, _, delivered = parse(b"MSG cam\xff 7 1\r\nx\r\nMSG cam 7 2\r\nok\r\n")
    assert parser.dropped == 1
    assert delivered == [b"ok"]


def test_the_buffer_is_compacted_and_bounded() -> None:
    one = b"MSG cam 7 1000\r\n" + b"x" * 1000 + b"\r\n"
    parser, _, delivered = parse(*[one] * 2000)
    assert len(delivered) == 2000
    assert len(parser.buf) < 64 * 1024


_HDR = b"NATS/1.0\r\nId: 1\r\n\r\n"
_VALID = (
    b"MSG cam 7 5\r\nhello\r\n"
    + b"HMSG cam 7 _INBOX.r %d %d\r\n%sabc\r\n" % (len(_HDR), len(_HDR) + 3, _HDR)
    + b"PING\r\n+OK\r\n"
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cut=st.integers(0, len(_VALID)),
    noise=st.binary(max_size=64),
    splits=st.lists(st.integers(1, 40), max_size=8),
)
def test_mutated_streams_raise_only_protocol_errors(
    cut: int, noise: bytes, splits: list[int]
) -> None:
    """Any bytes after (or inside) a valid stream: handled, or a ProtocolError."""
    wire = _VALID[:cut] + noise + _VALID
    pieces = []
    pos = 0
    for step in splits:
        pieces.append(wire[pos : pos + step])
        pos += step
    pieces.append(wire[pos:])
    hooks = StubHooks(fail_msgs=True)
    parser = FastParser(hooks)
    parser.route(SID, lambda subject, data, reply, headers: None)

    async def run() -> None:
        for piece in pieces:
            await parser.parse(piece)

    try:
        asyncio.run(run())
    except ProtocolError:
        pass
    assert len(parser.buf) <= len(wire) + 8 * 1024


# -- from a fake server socket: the backend reconnects and goes on ---------------------


@pytest.mark.parametrize(
    "bad",
    [
        b"MSG t.hostile %(sid)d 3\r\nhello\r\n",  # no CRLF after the payload
        b"MSG t.hostile " + b"1" * 5000 + b" 3\r\nabc\r\n",  # a 5,000-digit sid
        b"INFO {not json}\r\n",
        b"XYZZY\r\n" + b"A" * 5000,
    ],
    ids=["no-crlf", "long-sid", "info-not-json", "unknown-line"],
)
def test_backend_reconnects_after_a_bad_stream_and_delivers_what_follows(bad: bytes) -> None:
    server = FakeNats()
    backend = NATSPubSub(get_nats_config(env=server.env()))
    try:
        backend.subscribe("t.hostile")
        first = server.wait_conn(1)
        sid = first.subs["t.hostile"]
        first.send(bad.replace(b"%(sid)d", b"%d" % sid))
        assert first.closed.wait(10), "the client kept a connection whose stream is broken"
        second = server.wait_conn(2)  # nats-py came back and subscribed again
        second.send(b"MSG t.hostile %d 5\r\nafter\r\n" % second.subs["t.hostile"])
        message = backend.receive(10)
        assert message is not None and message.data == b"after"
        assert backend.receive(0.2) is None  # and never b"hel"
        assert backend.reconnects >= 1
    finally:
        backend.close()
        server.close()


def test_a_stalled_stream_does_not_hold_a_growing_buffer() -> None:
    """A server that sends an unknown line and then megabytes: the client drops it
    at once instead of buffering it all."""
    server = FakeNats()
    backend = NATSPubSub(get_nats_config(env=server.env()))
    try:
        backend.subscribe("t.hostile")
        first = server.wait_conn(1)
        started = time.monotonic()
        try:
            first.send(b"NOPE " + b"A" * (4 * 1024 * 1024))
        except OSError:
            pass  # the client hung up while we were still sending: what we want
        assert first.closed.wait(10)
        assert time.monotonic() - started < 10
    finally:
        backend.close()
        server.close()
