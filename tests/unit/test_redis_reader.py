"""The Redis subscriber's reply reader: large frames bypass hiredis, exactly.

Recorded streams are fed in chunks cut at many offsets; whatever the cuts, the
replies must equal what hiredis alone parses, large frames must take the direct
route, and payload bytes that look like protocol must never move a boundary.
"""

from __future__ import annotations

import random
from typing import Any

import hiredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msight_core.pubsub._redis.reader import ReplyStream, skip_reply

MiB = 1024 * 1024


def push(payload: bytes, channel: bytes = b"cam.frames", kind: bytes = b"message") -> bytes:
    parts = [kind, channel, payload]
    if kind == b"pmessage":  # pattern subscriptions: the glob comes first
        parts = [kind, b"cam.*", channel, payload]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


SUBSCRIBED = b"*3\r\n$9\r\nsubscribe\r\n$10\r\ncam.frames\r\n:1\r\n"
# A payload that imitates a large push header: it must be delivered as data.
DECOY = push(b"x" * 10)[:-12] + b"$999999999\r\n" + b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$300000\r\n"


class ChunkedSocket:
    """Hands out ``data`` in the given chunk sizes, as a socket's recv_into would."""

    def __init__(self, data: bytes, cuts: list[int]) -> None:
        self.data = memoryview(data)
        self.cuts = iter(cuts)
        self.pos = 0

    def recv_into(self, target: Any) -> int:
        if self.pos >= len(self.data):
            return 0
        want = next(self.cuts, len(self.data))
        n = min(len(target), want, len(self.data) - self.pos)
        target[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def normal(replies: list[Any]) -> list[Any]:
    """Replies comparable with ``==`` (hiredis error objects are not)."""
    return [(type(r), str(r)) if isinstance(r, Exception) else r for r in replies]


def reference(data: bytes) -> list[Any]:
    reader = hiredis.Reader()
    reader.feed(data)
    out = []
    while (reply := reader.gets()) is not False:
        out.append(reply)
    return out


def read_all(data: bytes, cuts: list[int]) -> tuple[list[Any], ReplyStream]:
    stream = ReplyStream(ChunkedSocket(data, list(cuts)))  # type: ignore[arg-type]
    out: list[Any] = []
    with pytest.raises(ConnectionResetError):
        while True:
            out.extend(stream.read())
    return out, stream


def mixed_stream(seed: int) -> bytes:
    rng = random.Random(seed)
    parts = [SUBSCRIBED]
    for i in range(30):
        kind = rng.choice(["small", "small", "big", "decoy", "error", "medium"])
        if kind == "small":
            parts.append(push(b"%d" % i * rng.randint(1, 300)))
        elif kind == "medium":
            parts.append(push(bytes(rng.randint(20_000, 120_000))))
        elif kind == "big":
            size = rng.choice([128 * 1024, 300_000, MiB, 3 * MiB + 7])
            kinds = [b"message", b"smessage", b"pmessage"]
            parts.append(push(rng.randbytes(size), kind=rng.choice(kinds)))
        elif kind == "decoy":
            parts.append(push(DECOY * rng.randint(1, 50)))
        else:
            parts.append(b"-ERR something refused\r\n")
    return b"".join(parts)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk", [1, 7, 4096, 16 * 1024 + 3, 200_000, MiB, 64 * MiB])
def test_same_replies_as_hiredis_whatever_the_cuts(seed: int, chunk: int) -> None:
    data = mixed_stream(seed)
    if chunk < 100:  # a few bytes per receive: a shorter stream, one large frame in it
        data = SUBSCRIBED + push(b"a" * 100) + push(bytes(range(256)) * (800 + 50 * seed))
        data += push(DECOY)
    cuts = [chunk] * (len(data) // chunk + 1)
    got, _ = read_all(data, cuts)
    assert normal(got) == normal(reference(data))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.lists(st.integers(1, 2 * MiB), min_size=1, max_size=40))
def test_random_cuts(seed: int, cuts: list[int]) -> None:
    data = mixed_stream(seed)
    got, _ = read_all(data, cuts)
    assert normal(got) == normal(reference(data))


def test_large_frames_take_the_direct_route() -> None:
    frames = [bytes([i]) * (2 * MiB) for i in range(5)]
    kinds = [b"message", b"pmessage", b"smessage", b"message", b"pmessage"]
    data = SUBSCRIBED + b"".join(push(f, kind=k) for f, k in zip(frames, kinds))
    data += push(b"small after")
    got, stream = read_all(data, [MiB] * 20)
    assert [r[-1] for r in got[1:]] == [*frames, b"small after"]
    assert [r[0] for r in got[1:-1]] == kinds
    assert got[2][1:3] == [b"cam.*", b"cam.frames"]
    assert stream.direct_frames == len(frames)
    assert all(type(r[-1]) is bytes for r in got[1:])


def test_a_frame_not_followed_by_crlf_is_a_protocol_error() -> None:
    bad = push(bytes(MiB))[:-2] + b"XX" + push(b"next")
    stream = ReplyStream(ChunkedSocket(bad, [4096] * 1000))  # type: ignore[arg-type]
    with pytest.raises(hiredis.ProtocolError):
        while True:
            stream.read()


def test_skip_reply_checks_lengths_against_the_bytes_present() -> None:
    buf = bytearray(push(b"hello"))
    assert skip_reply(buf, 0, len(buf)) == len(buf)
    assert skip_reply(buf, 0, len(buf) - 1) == -1  # incomplete
    for hostile in (
        b"$-5\r\n",
        b"$99999999999999999999\r\n",
        b"*1000000\r\n",
        b"?\r\n",
        b"$12a\r\n",
    ):
        assert skip_reply(bytearray(hostile), 0, len(hostile)) == -1
