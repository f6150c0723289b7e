"""The large-frame protocol of the NATS backend (not public API).

A payload above the server's ``max_payload`` goes in chunks followed by a small
*notice*, a message with headers only, on the topic itself. In core mode (the
default) the chunks go over core NATS on a side subject and nothing is stored
(:mod:`.chunks`, ``Msight-Frame-Stream: core``); in JetStream mode they are
stored durably, as follows.

In JetStream mode a large payload is stored as chunks on a private
subject (:data:`LARGE_SUBJECT_PREFIX` + frame id) of one in-memory JetStream
stream, :data:`LARGE_STREAM`; then a small *notice*, a message with headers
only, goes on the topic itself. Because the notice is an ordinary message, NATS
routes it like any other: every broadcast subscriber, or exactly one
queue-group member, gets it, and that receiver reads the chunks back through an
ordered consumer. No server setting changes.

Notice headers: :data:`FRAME_HEADER` (the frame id), ``Msight-Frame-Size``,
``Msight-Frame-Chunks`` and ``Msight-Frame-Stream``; :func:`notice_headers`
writes them and :meth:`LargeFrames.fetch` checks them against what arrives.
Anyone who can publish to a topic can send a notice, so a receiver checks it
before acting on it: the size at most half the store (as a publisher's), a
chunk count a publisher could have used, a literal frame id (no wildcard, no
``.``), our own stream only; then that the chunks are stored (waiting
:data:`_STORE_WAIT` at most, so a forged notice holds its subscription briefly).
Chunks are collected as they arrive, never more than the notice announced: a
notice allocates nothing by itself. A bad notice is counted in ``lost`` (and
terminated in JetStream mode).
Each chunk carries ``Nats-Msg-Id: <subject>.<index>``, so a resent chunk is
stored once. :class:`LargeFrames` owns the stream and reads frames back; the
publisher (:mod:`.publisher`) cuts and sends them. A subscriber reads both
kinds of notice, so it takes frames from older msight publishers too; an
older msight subscriber counts a core notice as malformed (``lost``) at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import nats.js.errors
from nats.js import api

from ...errors import PayloadTooLargeError
from .chunks import (
    CORE_STREAM,
    FETCH_PREFIX,
    SOURCE_HEADER,
    Assembler,
    Quiet,
    Retained,
    chunk_size,
    fetch,
    frame_pieces,
    parse_frame_id,
    reply_pieces,
    valid_reply,
)
from .emit import Paced
from .flow import Flow, confirmation, parse_confirmation

__all__ = [
    "FRAME_HEADER",
    "FRAME_MARKER",
    "LARGE_STREAM",
    "LARGE_SUBJECT_PREFIX",
    "LINGER_SECONDS",
    "LargeFrames",
    "chunk_header",
    "notice_headers",
]

logger = logging.getLogger("msight_core.pubsub.nats")

FRAME_HEADER = "Msight-Frame"
FRAME_MARKER = FRAME_HEADER.encode() + b":"  # in a header block: a notice, not data
LARGE_SUBJECT_PREFIX = "_msight.large."
LARGE_STREAM = "MSIGHT_LARGE_FRAMES"
_HEADROOM = 512  # bytes of max_payload kept for the chunk's headers
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,200}")  # a frame id from a notice: a literal token
_NUMBER = re.compile(r"[0-9]{1,12}")  # a size or count from a notice
_STORE_WAIT = 1.0  # seconds a notice may wait for its chunks to be in the stream
LINGER_SECONDS = 1.0  # a closing publisher waits this long at most for frame requests


def chunk_header(subject: bytes, index: int) -> bytes:
    """The header block of chunk ``index`` of the frame stored on ``subject``."""
    return b"NATS/1.0\r\nNats-Msg-Id: %s.%d\r\n\r\n" % (subject, index)


def notice_headers(frame_id: str, size: int, chunks: int, stream: str) -> bytes:
    """The header lines of a frame's notice, after the status line, unterminated."""
    return (
        "NATS/1.0\r\n"
        f"{FRAME_HEADER}: {frame_id}\r\n"
        f"Msight-Frame-Size: {size}\r\n"
        f"Msight-Frame-Chunks: {chunks}\r\n"
        f"Msight-Frame-Stream: {stream}\r\n"
    ).encode()


class LargeFrames:
    """Large frames of one backend: sent over core NATS (``core``) or through
    the stream of frame chunks shared by every msight publisher on a server,
    and read back from either."""

    def __init__(
        self,
        ttl: float,
        max_bytes: int,
        timeout: float,
        core: bool = False,
    ) -> None:
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.core = core
        self._ready = False
        self._lock: asyncio.Lock | None = None
        self.fetched = 0
        self._lost = 0
        self.assembler = Assembler(max_bytes // 2, max_bytes // 2)
        self._token = os.urandom(8)
        self._seqs = itertools.count(1)
        self._retained = Retained(max_bytes // 4)
        self._serving: Any = None
        self._answering = 0  # frame requests being answered
        self.quiet = Quiet(FETCH_PREFIX + self._token.hex())
        self._send: Callable[[Any], Awaitable[None]] | None = None
        self._chunk = chunk_size(1024 * 1024)
        self.flow = Flow()
        self._me = os.urandom(8)  # this subscriber's id in its confirmations
        self._nc: Any = None  # where confirmations go out (set by the subscriber)
        self._to_confirm: dict[bytes, int] = {}  # publisher token -> newest frame read
        self._confirming: Any = None  # the task sending them
        self.assembler.completed = self._completed

    @property
    def lost(self) -> int:
        """Frames (and chunks) received and not delivered."""
        return self._lost + self.assembler.lost

    @property
    def ready(self) -> bool:
        """The stream is known to exist on the current connection."""
        return self._ready

    def reset(self) -> None:
        """After a reconnect the server may have lost the (in-memory) stream."""
        self._ready = False

    @staticmethod
    def chunk_size(max_payload: int) -> int:
        return max(max_payload - _HEADROOM, 1024)

    def admit(
        self,
        size: int,
        max_payload: int,
        jetstream: bool,
        run: Callable[[Coroutine[Any, Any, Any], float | None, str], Any],
        nc: Any,
    ) -> None:
        """Check that a ``size``-byte payload can go as a large frame; blocks
        until the stream exists (``run`` runs a coroutine on the loop).

        Raises:
            PayloadTooLargeError: JetStream mode on a server without JetStream, or the payload is
                above half of the frame store.
        """
        self.check(size, max_payload, jetstream)
        if not self._ready and not self.core:
            run(self.ensure_stream(nc), self.timeout, "create the large-frame stream")

    def check(self, size: int, max_payload: int, jetstream: bool) -> None:
        """Raise :class:`PayloadTooLargeError` if a ``size``-byte payload cannot go
        as a large frame (see :meth:`admit`)."""
        if not jetstream and not self.core:
            raise PayloadTooLargeError(
                f"payload of {size} bytes exceeds the NATS server's max_payload "
                f"({max_payload} bytes) and the server has no JetStream to carry it: "
                "raise max_payload in the nats-server configuration (up to 64 MB) or "
                "start nats-server with JetStream (-js)"
            )
        if size > self.max_bytes // 2:
            raise PayloadTooLargeError(
                f"payload of {size} bytes exceeds half of the large-frame store "
                f"({self.max_bytes} bytes); raise MSIGHT_NATS_LARGE_FRAME_STORE_BYTES"
            )

    async def core_frame(
        self, nc: Any, topic: str, data: bytes, send: Callable[[Any], Awaitable[None]]
    ) -> tuple[Any, ...]:
        """Core mode, on the loop: the writer's pieces of a frame (chunks, then
        the notice); the frame is kept a while for those who ask for it, whose
        answers go out through ``send``."""
        if self._serving is None:
            self._send = send
            self._serving = await nc.subscribe(FETCH_PREFIX + self._token.hex(), cb=self._serve)
            await nc.subscribe(self.quiet.base + ".*", cb=self._no_responders)
        await self.flow.room(topic, len(data))
        seq = next(self._seqs)
        chunk = self._chunk = chunk_size(nc.max_payload)
        token = self._token.hex()
        notice = notice_headers(f"{token}{seq}", len(data), -(-len(data) // chunk), CORE_STREAM)
        notice += f"{SOURCE_HEADER}: {FETCH_PREFIX}{token}\r\n\r\n".encode()
        name = topic.encode()
        command = b"HPUB %s %d %d\r\n%s\r\n" % (name, len(notice), len(notice), notice)
        self._retained.add(seq, data, topic)
        self.flow.sent(seq, topic, len(data))
        probe = self.quiet.probe(topic)
        if probe is None:  # nobody subscribes the chunks: the notice only
            return (command,)
        return frame_pieces(topic, self._token, seq, data, chunk, command, probe)

    async def _no_responders(self, msg: Any) -> None:
        """The server's answer to a probe (:class:`.chunks.Quiet`)."""
        if msg.headers and msg.headers.get("Status") == "503":
            self.quiet.no_responders(msg.subject)

    async def _serve(self, msg: Any) -> None:
        """A request for a kept frame (from a queue-group member): the chunks go
        to its reply subject. Requests are peer input: checked, bounded."""
        reply = msg.reply.encode() if msg.reply else b""
        if not reply:  # a subscriber confirming a frame it read (.flow)
            confirmed = parse_confirmation(msg.data)
            if confirmed is not None:
                self.flow.confirm(*confirmed)
            return
        parsed = parse_frame_id(msg.data.decode("ascii", "replace"))
        if self._send is None or not valid_reply(reply):
            return
        data = None
        paced = False
        if parsed is not None and parsed[0] == self._token:
            data = self._retained.take(parsed[1])
            topic = self._retained.topic(parsed[1])
            if topic is not None:
                self.quiet.asked(topic)
                paced = self.flow.paced(topic)
        seq = parsed[1] if parsed is not None else 0
        pieces = reply_pieces(reply, self._token, seq, data, self._chunk)
        self._answering += 1
        try:
            # A member that confirms what it gets paces its answers (.emit.Paced).
            await self._send(Paced(pieces) if paced and data is not None else pieces)
        except Exception as exc:  # noqa: BLE001 - closing: the requester times out
            logger.debug("answering a frame request failed: %s", type(exc).__name__)
        finally:
            self._answering -= 1

    async def linger(self, timeout: float) -> None:
        """Before the connection closes (on the loop): wait until the frames
        queue-group members will ask for were asked for and answered, ``timeout``
        seconds at most. A member asks when its notice arrives, a round trip after
        the publish: a publisher that closes right after its last frame would
        otherwise leave that frame unanswered, and lost."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (
            self._answering or self._retained.awaited(self.quiet.asked_lately)
        ):
            await asyncio.sleep(0.005)

    def confirm_on(self, nc: Any) -> None:
        """Confirm frames read whole to their publishers over ``nc`` (a broadcast
        subscriber of chunks; :mod:`.flow`)."""
        self._nc = nc

    def _completed(self, token: bytes, seq: int) -> None:
        """The assembler has frame ``seq`` of publisher ``token`` whole: confirm it
        (the newest per publisher, from one task; on the loop)."""
        if self._nc is None or (token not in self._to_confirm and len(self._to_confirm) >= 256):
            return
        self._to_confirm[token] = seq
        if self._confirming is None:
            self._confirming = asyncio.ensure_future(self._send_confirmations())

    async def _send_confirmations(self) -> None:
        try:
            while self._to_confirm:
                token, seq = self._to_confirm.popitem()
                await self._nc.publish(FETCH_PREFIX + token.hex(), confirmation(self._me, seq))
        except Exception as exc:  # noqa: BLE001 - closing or disconnected: no pacing now
            logger.debug("confirming a large frame failed: %s", type(exc).__name__)
            self._to_confirm.clear()
        finally:
            self._confirming = None

    async def ensure_stream(self, nc: Any) -> str:
        """Create (or adopt) the chunk stream; on the loop."""
        if self._ready:
            return LARGE_STREAM
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._ready:
                return LARGE_STREAM
            config = api.StreamConfig(
                name=LARGE_STREAM,
                description="msight: chunks of frames above the server's max_payload",
                subjects=[LARGE_SUBJECT_PREFIX + ">"],
                storage=api.StorageType.MEMORY,
                retention=api.RetentionPolicy.LIMITS,
                discard=api.DiscardPolicy.OLD,
                max_age=self.ttl,
                max_bytes=self.max_bytes,
                duplicate_window=min(self.ttl, 120.0),
                num_replicas=1,
            )
            jsm = nc.jsm(timeout=self.timeout)
            try:
                await jsm.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != 10058:  # 10058: stream name in use (other settings)
                    raise
                await jsm.stream_info(LARGE_STREAM)  # it exists: use it as it is
                logger.info("using the existing %s stream with its own settings", LARGE_STREAM)
            self._ready = True
        return LARGE_STREAM

    def _check(
        self, headers: dict[str, str], max_payload: int, expect: str = LARGE_STREAM
    ) -> tuple[str, int, int] | None:
        """``(frame id, size, chunks)`` of a notice, or ``None`` if it is not one we
        could have sent: peers are untrusted, and these become a subject and a
        buffer. The size is bounded like a publisher's (half the store), the
        chunk count by the chunk sizes a publisher can use, the id is a literal
        token (no ``*``, ``>`` or ``.``), and the stream is ``expect``."""
        try:
            frame_id = headers[FRAME_HEADER]
            size_text = headers["Msight-Frame-Size"]
            chunks_text = headers["Msight-Frame-Chunks"]
            stream = headers.get("Msight-Frame-Stream", LARGE_STREAM)
        except (KeyError, TypeError):
            return None
        if not (
            isinstance(frame_id, str)
            and _TOKEN.fullmatch(frame_id)
            and stream == expect
            and _NUMBER.fullmatch(size_text)
            and _NUMBER.fullmatch(chunks_text)
        ):
            return None
        size, chunks = int(size_text), int(chunks_text)
        largest = (
            self.chunk_size(max_payload) if expect == LARGE_STREAM else chunk_size(max_payload)
        )
        fewest = -(-size // max(largest, 1))
        most = -(-size // 1024)  # a chunk is at least 1 KB
        if not (0 < size <= self.max_bytes // 2 and fewest <= chunks <= most):
            return None
        return frame_id, size, chunks

    async def _stored(self, nc: Any, subject: str, chunks: int) -> bool:
        """Whether the stream holds ``chunks`` messages on ``subject``; waits
        :data:`_STORE_WAIT` at most (the chunks of a real frame are stored before
        its notice goes out, but the stream writes them on its own time)."""
        jsm = nc.jsm(timeout=self.timeout)  # the wait for the chunks is bounded below
        deadline = time.monotonic() + _STORE_WAIT
        delay = 0.01
        while True:
            info = await jsm.stream_info(LARGE_STREAM, subjects_filter=subject)
            count = (info.state.subjects or {}).get(subject, 0)
            if count >= chunks:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(delay, remaining))
            delay *= 2

    async def fetch(self, nc: Any, topic: str, headers: dict[str, str]) -> bytes | None:
        """Read a frame's chunks back; ``None`` (logged, counted) if the notice is
        malformed or the frame is gone.

        A notice costs its subscription a short, bounded wait at most
        (:data:`_STORE_WAIT` for the chunks to be there, then the time to read
        them); nothing is allocated before chunks arrive, and never more than
        the notice announced.
        """
        max_payload = int(getattr(nc, "max_payload", 0) or 1024 * 1024)
        if headers.get("Msight-Frame-Stream") == CORE_STREAM:
            return await self._fetch_core(nc, topic, headers, max_payload)
        checked = self._check(headers, max_payload)
        if checked is None:
            self._lost += 1
            logger.warning("malformed large-frame notice on %r ignored", topic)
            return None
        frame_id, size, chunks = checked
        subject = LARGE_SUBJECT_PREFIX + frame_id
        parts: list[bytes] = []
        received = 0
        sub = None
        try:
            if not await self._stored(nc, subject, chunks):
                raise LookupError("no such frame")
            deadline = time.monotonic() + self.timeout
            sub = await nc.jetstream(timeout=self.timeout).subscribe(
                subject,
                stream=LARGE_STREAM,
                ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.ALL,
                pending_bytes_limit=max(2 * size, 64 * 1024 * 1024),
            )
            while len(parts) < chunks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                data = (await sub.next_msg(timeout=remaining)).data
                received += len(data)
                if received > size:
                    raise ValueError("chunks exceed the announced size")
                parts.append(data)
            if received != size:
                raise ValueError("chunks do not add up to the announced size")
        except Exception as exc:  # noqa: BLE001 - a lost frame must not stop the reader
            self._lost += 1
            logger.warning(
                "large frame on %r lost (%d of %d chunks read: %s); frames are kept %gs "
                "in the %s stream",
                topic,
                len(parts),
                chunks,
                type(exc).__name__,
                self.ttl,
                LARGE_STREAM,
            )
            return None
        finally:
            if sub is not None:
                try:
                    await sub.unsubscribe()
                except Exception:
                    logger.debug("unsubscribing a frame consumer failed", exc_info=True)
        self.fetched += 1
        return b"".join(parts)

    async def _fetch_core(
        self, nc: Any, topic: str, headers: dict[str, str], max_payload: int
    ) -> bytes | None:
        """A core notice: the frame the chunks brought, or asked from its publisher."""
        checked = self._check(headers, max_payload, CORE_STREAM)
        parsed = parse_frame_id(checked[0]) if checked is not None else None
        if checked is None or parsed is None:
            self._lost += 1
            logger.warning("malformed large-frame notice on %r ignored", topic)
            return None
        token, seq = parsed
        _, size, chunks = checked
        data = self.assembler.claim(token, topic, seq)
        if data is not None and len(data) == size:
            self.fetched += 1
            return data
        source = headers.get(SOURCE_HEADER)
        try:
            if source != FETCH_PREFIX + token.hex():
                raise LookupError("the notice names no source of ours")
            data = await fetch(nc, source, token, seq, size, chunks, self.timeout)
            self._nc = nc
            self._completed(token, seq)  # confirmed as a broadcast subscriber's chunks are
        except Exception as exc:  # noqa: BLE001 - a lost frame must not stop the reader
            self._lost += 1
            logger.warning(
                "large frame on %r lost (asked its publisher: %s)", topic, type(exc).__name__
            )
            return None
        self.fetched += 1
        return data
