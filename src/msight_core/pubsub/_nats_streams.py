"""JetStream helpers of the NATS backend (not public API).

:class:`LargeFrames` carries payloads above the server's ``max_payload``: the
writer stores the frame as chunks on a private subject of one in-memory stream,
then publishes a small *notice* (headers only) on the topic itself. Because the
notice is an ordinary message, NATS routes it like any other: every broadcast
subscriber, or exactly one queue-group member, gets it, and that receiver
reads the chunks back through an ordered consumer. No server setting changes.

:func:`ensure_topic_stream` and :func:`durable_name` serve JetStream mode.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from typing import Any

from ..errors import BrokerError
from ._nats_conn import nats
from ._nats_pub import LARGE_SUBJECT_PREFIX

__all__ = ["LARGE_STREAM", "LargeFrames", "durable_name", "ensure_topic_stream"]

logger = logging.getLogger("msight_core.pubsub.nats")

LARGE_STREAM = "MSIGHT_LARGE_FRAMES"
_HEADROOM = 512  # bytes of max_payload kept for the chunk's headers
_NAME_RE = re.compile(r"[^A-Za-z0-9_-]")

api = nats.js.api


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

    def reset(self) -> None:
        """After a reconnect the server may have lost the (in-memory) stream."""
        self._ready = False

    @staticmethod
    def chunk_size(max_payload: int) -> int:
        return max(max_payload - _HEADROOM, 1024)

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
            frame_id = headers["Msight-Frame"]
            size = int(headers["Msight-Frame-Size"])
            chunks = int(headers["Msight-Frame-Chunks"])
            stream = headers.get("Msight-Frame-Stream", LARGE_STREAM)
        except (KeyError, ValueError):
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


def _stream_name(topic: str) -> str:
    digest = hashlib.sha1(topic.encode()).hexdigest()[:8]
    return f"MSIGHT_{_NAME_RE.sub('_', topic)[:100]}_{digest}"


def durable_name(group_id: str) -> str:
    """A JetStream consumer name for ``group_id`` (stable across restarts)."""
    clean = _NAME_RE.sub("_", group_id)[:100]
    if clean != group_id:
        clean += "_" + hashlib.sha1(group_id.encode()).hexdigest()[:8]
    return clean


async def ensure_topic_stream(
    nc: Any, topic: str, max_age: float, max_bytes: int, timeout: float, replicas: int = 1
) -> str:
    """The stream that stores ``topic``: an existing one, or a new file stream
    replicated on ``replicas`` servers of a JetStream cluster."""
    jsm = nc.jsm(timeout=timeout)
    try:
        return str(await jsm.find_stream_name_by_subject(topic))
    except nats.js.errors.NotFoundError:
        pass
    name = _stream_name(topic)
    config = api.StreamConfig(
        name=name,
        description=f"msight topic {topic}",
        subjects=[topic],
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.OLD,
        max_age=max_age,
        max_bytes=max_bytes or -1,
        duplicate_window=min(max_age, 120.0),
        num_replicas=replicas,
    )
    try:
        await jsm.add_stream(config)
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != 10058:
            raise BrokerError(
                f"NATS JetStream cannot create a stream for {topic!r}: {exc.description}"
            ) from exc
    return name
