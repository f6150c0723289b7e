"""The large-frame protocol of the NATS backend (not public API).

A payload above the server's ``max_payload`` is stored as chunks on a private
subject (:data:`LARGE_SUBJECT_PREFIX` + frame id) of one in-memory JetStream
stream, :data:`LARGE_STREAM`; then a small *notice*, a message with headers
only, goes on the topic itself. Because the notice is an ordinary message, NATS
routes it like any other: every broadcast subscriber, or exactly one
queue-group member, gets it, and that receiver reads the chunks back through an
ordered consumer. No server setting changes.

Notice headers: :data:`FRAME_HEADER` (the frame id), ``Msight-Frame-Size``,
``Msight-Frame-Chunks`` and ``Msight-Frame-Stream``; :func:`notice_headers`
writes them and :meth:`LargeFrames.fetch` checks them against what arrives.
Each chunk carries ``Nats-Msg-Id: <subject>.<index>``, so a resent chunk is
stored once. :class:`LargeFrames` owns the stream and reads frames back; the
publisher (:mod:`.publisher`) cuts and sends them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any

import nats.js.errors
from nats.js import api

from ...errors import PayloadTooLargeError

__all__ = [
    "FRAME_HEADER",
    "FRAME_MARKER",
    "LARGE_STREAM",
    "LARGE_SUBJECT_PREFIX",
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
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,200}")  # a frame id or stream name from a notice


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
    """The stream of frame chunks, shared by every msight publisher on a server."""

    def __init__(self, ttl: float, max_bytes: int, timeout: float) -> None:
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._ready = False
        self._lock: asyncio.Lock | None = None
        self.fetched = 0
        self.lost = 0

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
            PayloadTooLargeError: no JetStream on the server, or the payload is
                above half of the frame store.
        """
        if not jetstream:
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
        if not self._ready:
            run(self.ensure_stream(nc), self.timeout, "create the large-frame stream")

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

    async def fetch(self, nc: Any, topic: str, headers: dict[str, str]) -> bytes | None:
        """Read a frame's chunks back; ``None`` (logged, counted) if it is gone."""
        try:
            frame_id = headers[FRAME_HEADER]
            size = int(headers["Msight-Frame-Size"])
            chunks = int(headers["Msight-Frame-Chunks"])
            stream = headers.get("Msight-Frame-Stream", LARGE_STREAM)
        except (KeyError, ValueError):
            frame_id = stream = ""
            size = chunks = -1
        # Peers are untrusted: the size bounds the buffer, the names become subjects.
        if not (
            0 < size <= self.max_bytes
            and 0 < chunks <= size
            and _TOKEN.fullmatch(frame_id)
            and _TOKEN.fullmatch(stream)
        ):
            self.lost += 1
            logger.warning("malformed large-frame notice on %r ignored", topic)
            return None
        buf = bytearray(size)
        offset = 0
        received = 0
        deadline = time.monotonic() + self.timeout
        sub = None
        try:
            sub = await nc.jetstream(timeout=self.timeout).subscribe(
                LARGE_SUBJECT_PREFIX + frame_id,
                stream=stream,
                ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.ALL,
                pending_bytes_limit=max(4 * size, 64 * 1024 * 1024),
            )
            while received < chunks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                msg = await sub.next_msg(timeout=remaining)
                data = msg.data
                end = offset + len(data)
                if end > size:
                    raise ValueError("chunks exceed the announced size")
                buf[offset:end] = data
                offset = end
                received += 1
            if offset != size:
                raise ValueError("chunks do not add up to the announced size")
        except Exception as exc:  # noqa: BLE001 - a lost frame must not stop the reader
            self.lost += 1
            logger.warning(
                "large frame on %r lost (%d of %d chunks read: %s); frames are kept %gs "
                "in the %s stream",
                topic,
                received,
                chunks,
                type(exc).__name__,
                self.ttl,
                stream,
            )
            return None
        finally:
            if sub is not None:
                try:
                    await sub.unsubscribe()
                except Exception:
                    logger.debug("unsubscribing a frame consumer failed", exc_info=True)
        self.fetched += 1
        return bytes(buf)
