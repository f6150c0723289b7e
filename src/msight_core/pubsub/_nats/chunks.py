"""Large frames over core NATS, the default mode's path (not public API).

A payload above ``max_payload`` goes as *chunks*, plain messages on a side
subject, :data:`CHUNK_PREFIX` + topic, followed on the same connection by the
frame's *notice* on the topic (:mod:`.frames`, ``Msight-Frame-Stream: core``).
NATS keeps one connection's messages in order, so a broadcast subscriber, which
subscribes the side subject too, has the whole frame by the time the notice
arrives: :class:`Assembler` collects it and the notice hands it over. Nothing
is stored on the server; no JetStream is needed.

A queue-group member does not subscribe the side subject (every member would
get every frame's bytes): when its notice comes, it asks the publisher for the
frame (:func:`fetch`), a request to the publisher's own subject,
:data:`FETCH_PREFIX` + its token, which the publisher answers from the frames
it keeps for a short while (:class:`Retained`) with the chunks, addressed to
the requester only. A broadcast subscriber whose chunks went missing (a slow
consumer drop, say) asks the same way.

The first chunk of a frame carries a reply subject of the publisher: nats-server
answers it with a "no responders" status when nobody subscribes the side
subject, and a topic nobody reads at all then gets its frames as notices only
for a while (:class:`Quiet`). Subscribers ignore the reply subject (the
format is unchanged otherwise: publishers and subscribers of the previous
version interoperate).

Chunk payload: a 40-byte head (:data:`HEAD`: magic ``MSCK``, version, the
publisher's 8-byte token, frame sequence number, chunk index, chunk count,
frame size), then the bytes. **Peers are untrusted**: anyone who can publish
on a subject can forge chunks and notices. A chunk is checked (magic,
version, sizes, index in order) before it is kept; a subscriber keeps one
frame in progress per publisher and topic (a newer one drops an older
incomplete one), at most :attr:`Assembler.max_bytes` in all (the oldest go
first) and each for :data:`HOLD_SECONDS` at most; every drop is counted. A
notice makes a subscriber send one small request at most, to a literal
``FETCH_PREFIX`` subject named by the frame id, and wait :data:`FETCH_WAIT` at
most; a publisher answers a request for a frame it keeps (each at most
:data:`MAX_SERVES` times) to a literal reply subject, or with an empty message.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

__all__ = [
    "CHUNK_PREFIX",
    "CORE_STREAM",
    "FETCH_PREFIX",
    "HEAD",
    "SOURCE_HEADER",
    "Assembler",
    "Quiet",
    "Retained",
    "chunk_size",
    "fetch",
    "frame_pieces",
    "parse_frame_id",
    "reply_pieces",
]

logger = logging.getLogger("msight_core.pubsub.nats")

CHUNK_PREFIX = "_msight.chunks."
FETCH_PREFIX = "_msight.frames."
CORE_STREAM = "core"  # Msight-Frame-Stream of a frame sent over core NATS
SOURCE_HEADER = "Msight-Frame-Source"
HEAD = struct.Struct("<4sB3x8sQIIQ")  # magic, version, publisher, seq, index, count, size
MAGIC = b"MSCK"
VERSION = 1
HOLD_SECONDS = 5.0  # a frame (in progress or waiting for its notice) is kept this long
MAX_KEYS = 256  # publishers x topics with a frame in progress
FETCH_WAIT = 2.0  # seconds a notice may wait for a frame asked from its publisher
MAX_SERVES = 16  # answers per kept frame (one per queue group reading the topic)
RETAIN_SECONDS = 5.0  # a publisher keeps a frame this long at most ...
RETAIN_BYTES = 64 * 1024 * 1024  # ... and its frames up to this, or while asked for:
ASKED_SECONDS = 10.0  # up to Retained.max_bytes until this long after the last request
# ... and, requested or not, frames this young (up to Retained.max_bytes): the first
# request of a queue-group member takes a round trip, during which a flat-out
# burst can add more than RETAIN_BYTES (6 x 16 MB lost its first 2 frames so).
GRACE_SECONDS = 0.25
QUIET_SECONDS = 1.0  # a topic nobody reads gets notices only, this long
MAX_PROBED = 1024  # topics a publisher keeps a probe subject for
_CRLF = b"\r\n"
_PROBE_ID = re.compile(r"[0-9]{1,9}")
_FRAME_ID = re.compile(r"([0-9a-f]{16})([0-9]{1,19})")
_REPLY = re.compile(rb"[A-Za-z0-9_.-]{1,256}")  # a literal subject: no wildcard, no space


def chunk_size(max_payload: int) -> int:
    """Bytes of a frame per chunk: the chunk and its head fill ``max_payload``."""
    return max(max_payload - HEAD.size, 1024)


def parse_frame_id(frame_id: str) -> tuple[bytes, int] | None:
    """``(publisher token, sequence number)`` of a frame id, ``None`` if malformed."""
    match = _FRAME_ID.fullmatch(frame_id)
    if match is None:
        return None
    return bytes.fromhex(match.group(1)), int(match.group(2))


def _chunks(
    subject: bytes, token: bytes, seq: int, data: bytes, chunk: int, probe: bytes = b""
) -> list[Any]:
    """The ``PUB`` commands of ``data``'s chunks, in pieces (the bytes not copied);
    the first with the reply subject ``probe``, if given."""
    view = memoryview(data)
    size = len(data)
    count = -(-size // chunk)
    pieces: list[Any] = []
    for index in range(count):
        part = view[index * chunk : (index + 1) * chunk]
        head = HEAD.pack(MAGIC, VERSION, token, seq, index, count, size)
        target = subject + b" " + probe if probe and not index else subject
        pieces += (b"PUB %s %d\r\n%s" % (target, HEAD.size + len(part), head), part, _CRLF)
    return pieces


def frame_pieces(
    topic: str, token: bytes, seq: int, data: bytes, chunk: int, notice: bytes, probe: bytes
) -> tuple[Any, ...]:
    """A frame as one message for the writer: its chunks on the side subject,
    then ``notice`` (a whole ``HPUB`` command) on the topic. The first chunk
    carries the reply subject ``probe``: if nobody subscribes the side subject,
    the server answers there with a no-responders status (see :class:`Quiet`)."""
    subject = (CHUNK_PREFIX + topic).encode()
    return (*_chunks(subject, token, seq, data, chunk, probe), notice)


def reply_pieces(reply: bytes, token: bytes, seq: int, data: bytes | None, chunk: int) -> Any:
    """The answer to a fetch: the chunks to ``reply``, or an empty message."""
    if data is None:
        return b"PUB %s 0\r\n\r\n" % reply
    return tuple(_chunks(reply, token, seq, data, chunk))


def valid_reply(reply: bytes) -> bool:
    """A reply subject a publisher may answer: literal, bounded, no spaces."""
    return _REPLY.fullmatch(reply) is not None and b".." not in reply


class Quiet:
    """A publisher's topics nobody reads, found by probing: their frames go
    without chunks.

    The first chunk of a frame carries a reply subject of the publisher,
    ``<base>.<n>`` (:meth:`probe`; ``n`` stands for the topic). When no
    subscription matches the side subject, nats-server answers there with a 503
    no-responders status (:meth:`no_responders`); unless someone asked for one
    of the topic's frames in the last :data:`QUIET_SECONDS` (queue-group
    members do, for every frame), nobody reads the topic and its frames go as
    notices only for :data:`QUIET_SECONDS`; the frame after that probes again.
    A subscriber that joins meanwhile finds no chunks and asks for the frame,
    which ends the quiet at once (:meth:`asked`).

    Why not also skip the chunks when only queue-group members read the topic:
    sending them holds a flat-out publisher to what the server moves, which is
    about what the members' requests can fetch; without them the publisher
    outran the members and the frames they had not fetched yet expired (118-129
    of 200 frames of 4 MiB lost). Tried again with the publisher paced by the
    members' confirmations (:mod:`.flow`): 83 of 200 lost. With notices only,
    nothing but confirmations holds the publisher back: before a member's first
    one, and whenever a member is silent for ``flow.QUIET``, the publisher sends
    notices as fast as it is called and the frames behind them expire.
    Anyone can publish a 503 to ``<base>.<n>``: a
    forged one costs frame requests, not frames. Used on the event loop only.
    """

    def __init__(self, base: str) -> None:
        self.base = base
        self._ids: dict[str, int] = {}
        self._topics: dict[int, str] = {}
        self._until: dict[str, float] = {}  # topic -> no chunks until
        self._asked: dict[str, float] = {}  # topic -> a frame of it was asked for until
        self.skipped = 0  # frames sent without chunks

    def probe(self, topic: str) -> bytes | None:
        """The reply subject for the first chunk of ``topic``'s next frame;
        ``None``: send that frame without chunks."""
        until = self._until.get(topic)
        if until is not None:
            if time.monotonic() < until:
                self.skipped += 1
                return None
            del self._until[topic]
        number = self._ids.get(topic)
        if number is None:
            if len(self._ids) >= MAX_PROBED:
                self._ids.clear()
                self._topics.clear()
                self._until.clear()
                self._asked.clear()
            number = self._ids[topic] = len(self._ids)
            self._topics[number] = topic
        return f"{self.base}.{number}".encode()

    def no_responders(self, subject: str) -> None:
        """The server found no subscriber for the chunks probed with ``subject``."""
        number = subject.rpartition(".")[2]
        topic = self._topics.get(int(number)) if _PROBE_ID.fullmatch(number) else None
        now = time.monotonic()
        if topic is not None and self._asked.get(topic, 0.0) <= now:
            self._until[topic] = now + QUIET_SECONDS

    def asked_lately(self, topic: str) -> bool:
        """Whether someone asked for a frame of ``topic`` in the last
        :data:`QUIET_SECONDS` (queue-group members read it)."""
        return self._asked.get(topic, 0.0) > time.monotonic()

    def asked(self, topic: str) -> None:
        """Someone asked for a frame of ``topic``: chunks again, and for a while."""
        self._until.pop(topic, None)
        if len(self._asked) < MAX_PROBED or topic in self._asked:
            self._asked[topic] = time.monotonic() + QUIET_SECONDS


class Retained:
    """A publisher's recent frames, for queue-group members that ask for them.

    Holds references to the published bytes (no copy): the last frame always,
    older ones while younger than :data:`RETAIN_SECONDS` and together under
    :data:`RETAIN_BYTES`, or under ``max_bytes`` while members ask for frames
    (a request in the last :data:`ASKED_SECONDS`) or while they are younger than
    :data:`GRACE_SECONDS` (the first request is a round trip away): a member
    that lags a burst still finds its frames, and a publisher nobody asks holds
    little. Used on the event loop only.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(max_bytes, RETAIN_BYTES)
        # seq -> [data, at, serves, topic]
        self._frames: OrderedDict[int, list[Any]] = OrderedDict()
        self._bytes = 0
        self._asked_until = 0.0
        self.served = 0
        self.refused = 0

    def add(self, seq: int, data: bytes, topic: str = "") -> None:
        self._frames[seq] = [data, time.monotonic(), 0, topic]
        self._bytes += len(data)
        self._trim()

    def _trim(self) -> None:
        now = time.monotonic()
        cutoff = now - RETAIN_SECONDS
        young = now - GRACE_SECONDS
        asked = now < self._asked_until
        frames = self._frames
        while len(frames) > 1:
            data, at, _, _ = next(iter(frames.values()))
            if at >= cutoff and (
                self._bytes <= RETAIN_BYTES
                or (self._bytes <= self.max_bytes and (asked or at >= young))
            ):
                break
            frames.popitem(last=False)
            self._bytes -= len(data)

    def awaited(self, asked: Callable[[str], bool]) -> int:
        """Frames kept and not yet asked for that a queue-group member may still
        ask for: on topics whose frames are ``asked`` for, and any younger than
        :data:`GRACE_SECONDS` (a member's first request is a round trip away)."""
        now = time.monotonic()
        cutoff, young = now - RETAIN_SECONDS, now - GRACE_SECONDS
        return sum(
            1
            for _, at, serves, topic in self._frames.values()
            if not serves and (at >= young or (at >= cutoff and asked(topic)))
        )

    def topic(self, seq: int) -> str | None:
        """The topic frame ``seq`` went on, if it is kept."""
        entry = self._frames.get(seq)
        return entry[3] if entry is not None else None  # type: ignore[no-any-return]

    def take(self, seq: int) -> bytes | None:
        """The frame ``seq`` for one more requester, or ``None`` (gone, or served enough)."""
        self._asked_until = time.monotonic() + ASKED_SECONDS
        self._trim()
        entry = self._frames.get(seq)
        if entry is None or entry[2] >= MAX_SERVES or time.monotonic() - entry[1] > RETAIN_SECONDS:
            self.refused += 1
            return None
        entry[2] += 1
        self.served += 1
        return entry[0]  # type: ignore[no-any-return]


class _Building:
    __slots__ = ("at", "count", "parts", "received", "seq", "size")

    def __init__(self, seq: int, count: int, size: int) -> None:
        self.seq, self.count, self.size = seq, count, size
        # Each chunk copied once out of the parser's buffer, then joined: what is
        # held grows with what arrived, never allocated ahead for a size a peer
        # named (a growing bytearray would copy on its reallocations).
        self.parts: list[bytes] = []
        self.received = 0
        self.at = time.monotonic()


class Assembler:
    """A subscriber's frames arriving as chunks, until their notices claim them.

    :meth:`on_chunk` is a direct route of the parser, taking views of its
    buffer (or called from a subscription callback, with ``bytes``); :meth:`claim`
    is called when a notice arrives.
    Both run on the event loop. ``lost`` counts dropped chunks and frames.

    Args:
        max_frame: the largest frame accepted (as a publisher's bound).
        max_bytes: bytes held in all (frames in progress and unclaimed ones).
    """

    def __init__(self, max_frame: int, max_bytes: int) -> None:
        self.max_frame = max_frame
        self.max_bytes = max_bytes
        self._building: OrderedDict[tuple[bytes, str], _Building] = OrderedDict()
        self._done: OrderedDict[tuple[bytes, str, int], tuple[bytes, float]] = OrderedDict()
        self.held = 0
        self.lost = 0
        self.completed: Callable[[bytes, int], None] | None = None
        """Told ``(publisher token, seq)`` of each frame read whole."""

    def _drop(self, what: str, topic: str) -> None:
        self.lost += 1
        if self.lost == 1 or self.lost % 100 == 0:
            logger.warning(
                "large-frame chunk dropped on %r: %s (%d dropped so far)", topic, what, self.lost
            )

    def on_chunk(
        self,
        subject: str,
        data: bytes | memoryview,
        reply: bytes = b"",
        headers: bytes | None = None,
    ) -> None:
        topic = subject.removeprefix(CHUNK_PREFIX)
        if len(data) <= HEAD.size:
            return self._drop("too short", topic)
        magic, version, token, seq, index, count, size = HEAD.unpack_from(data)
        part = len(data) - HEAD.size
        if not (
            magic == MAGIC
            and version == VERSION
            and 0 < size <= self.max_frame
            and index < count <= -(-size // 1024)
        ):
            return self._drop("not a chunk msight sends", topic)
        key = (token, topic)
        now = time.monotonic()
        self._expire(now)
        building = self._building.get(key)
        if building is not None and building.seq != seq:
            if seq < building.seq:
                return self._drop("older than the frame in progress", topic)
            self._forget(key, building)
            self._drop("a newer frame started before this one was complete", topic)
            building = None
        if building is None:
            if index != 0:
                return None if (token, topic, seq) in self._done else self._drop("no start", topic)
            building = self._building[key] = _Building(seq, count, size)
            if len(self._building) > MAX_KEYS:
                old_key, old = next(iter(self._building.items()))
                self._forget(old_key, old)
                self._drop("too many frames in progress", old_key[1])
        elif index < len(building.parts):
            return None  # a second subscription matching the same subject: a copy
        if index != len(building.parts) or (count, size) != (building.count, building.size):
            self._forget(key, building)
            return self._drop("chunks out of order or inconsistent", topic)
        if building.received + part > size or (index + 1 == count) != (
            building.received + part == size
        ):
            self._forget(key, building)
            return self._drop("chunks do not add up to the frame size", topic)
        if not self._room(part, key):
            self._forget(key, building)
            return self._drop("frames held exceed the bound", topic)
        with memoryview(data) as view:
            building.parts.append(view[HEAD.size :].tobytes())
        building.received += part
        self.held += part
        if index + 1 == count:
            del self._building[key]
            whole = b"".join(building.parts)
            building.parts = []
            self._done[(token, topic, seq)] = (whole, now)
            if self.completed is not None:
                self.completed(token, seq)
        return None

    def claim(self, token: bytes, topic: str, seq: int) -> bytes | None:
        """The frame ``seq`` of publisher ``token`` on ``topic``, if it arrived
        whole; older unclaimed frames of that publisher and topic are dropped."""
        frame = self._done.pop((token, topic, seq), None)
        if frame is not None:
            self.held -= len(frame[0])
            for key in [k for k in self._done if k[:2] == (token, topic) and k[2] < seq]:
                self.held -= len(self._done.pop(key)[0])
                self._drop("its notice never came", topic)
            return frame[0]
        return None

    def _forget(self, key: tuple[bytes, str], building: _Building) -> None:
        self.held -= building.received
        building.parts = []
        self._building.pop(key, None)

    def _room(self, need: int, keep: tuple[bytes, str]) -> bool:
        """Make room for ``need`` more bytes, dropping the oldest unclaimed frames
        and then other frames in progress; ``False`` if it cannot be made."""
        while self.held + need > self.max_bytes and self._done:
            key, (data, _) = self._done.popitem(last=False)
            self.held -= len(data)
            self._drop("frames held exceed the bound", key[1])
        for key in list(self._building):
            if self.held + need <= self.max_bytes:
                break
            if key != keep:
                self._forget(key, self._building[key])
                self._drop("frames held exceed the bound", key[1])
        return self.held + need <= self.max_bytes

    def _expire(self, now: float) -> None:
        cutoff = now - HOLD_SECONDS
        while self._done:
            key, (data, at) = next(iter(self._done.items()))
            if at >= cutoff:
                break
            del self._done[key]
            self.held -= len(data)
            self._drop("its notice never came", key[1])
        for key in [k for k, b in self._building.items() if b.at < cutoff]:
            self._forget(key, self._building[key])
            self._drop("the frame was not complete in time", key[1])


async def fetch(
    nc: Any,
    source: str,
    token: bytes,
    seq: int,
    size: int,
    count: int,
    timeout: float,
) -> bytes:
    """Ask the publisher (``source``) for frame ``seq``; its bytes.

    Waits :data:`FETCH_WAIT` (or ``timeout``, if shorter) at most; allocates no
    more than what arrives, never more than ``size``.

    Raises:
        LookupError: the publisher does not have the frame (or is gone).
        ValueError: what came back is not the frame announced.
        asyncio.TimeoutError: not all of it came in time.
    """
    inbox = nc.new_inbox()
    sub = await nc.subscribe(
        inbox, pending_msgs_limit=count + 2, pending_bytes_limit=size + 64 * (count + 2)
    )
    try:
        await nc.publish(source, f"{token.hex()}{seq}".encode(), reply=inbox)
        deadline = time.monotonic() + min(timeout, FETCH_WAIT)
        parts: list[memoryview] = []  # views of the chunks: joined, copied once
        received = 0
        while len(parts) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise asyncio.TimeoutError
            data = (await sub.next_msg(timeout=remaining)).data
            if not data:
                raise LookupError("the publisher does not have the frame")  # or no responders
            if len(data) <= HEAD.size:
                raise ValueError("not a chunk")
            head = HEAD.unpack_from(data)
            if head != (MAGIC, VERSION, token, seq, len(parts), count, size):
                raise ValueError("not a chunk of the frame asked for")
            received += len(data) - HEAD.size
            if received > size:
                raise ValueError("chunks exceed the announced size")
            parts.append(memoryview(data)[HEAD.size :])
        if received != size:
            raise ValueError("chunks do not add up to the announced size")
        return b"".join(parts)
    finally:
        try:
            await sub.unsubscribe()
        except Exception:
            logger.debug("unsubscribing a frame fetch failed", exc_info=True)
