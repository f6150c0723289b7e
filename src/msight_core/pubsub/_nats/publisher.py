"""The NATS backend's publishing side, :class:`Publisher` (not public API).

``publish()`` (any thread) formats the protocol command itself and appends it to
an outgoing buffer; a single writer coroutine on the backend's event loop moves
whatever has accumulated to the connection in one piece, in order, through
:class:`.internals.Wire`. No round trip and no loop hand-off per message: the
loop is woken only when the writer was idle.

Messages that need an acknowledgement from JetStream (JetStream-mode publishes
and their large frames' chunks) carry a reply subject under a private inbox and a
``Nats-Msg-Id``; they stay in ``_sent`` until the stream acknowledges them, and
are sent again after a reconnect or when the ack is late. Their bytes count
against ``buffer_bytes`` with the unsent ones: ``publish()`` waits for room, then
raises ``BackpressureError``, while acknowledgements are outstanding. The stream drops the
duplicates by message id, so a resend never stores a message twice. Payloads
above ``max_payload`` are cut into chunks by the writer: sent over core NATS
(:mod:`.chunks`), or stored in the large-frame stream in JetStream mode.

Core NATS has no receipts: the writer sends a PING after new traffic, so a
disconnect can tell how many messages were handed over since the last PONG
(:meth:`Publisher.lost_connection`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ...config import PublishConfig
from ...errors import BackpressureError, ClosedError, MsightError, PublishError
from .commands import CRLF, Commands, Frame, Tracked
from .emit import emit, frame_bytes
from .frames import LargeFrames
from .internals import Wire

__all__ = ["Publisher"]

logger = logging.getLogger("msight_core.pubsub.nats")

_EMIT_BYTES = 8 * 1024 * 1024  # a batch of tracked messages is handed over in such steps
_DIRECT_BYTES = 128 * 1024  # payloads from this size are handed over without a copy
_ACK_CHECK_INTERVAL = 1.0
_CONFIRM_INTERVAL = 0.05  # core NATS: PING this often while messages flow
_RETRY_DELAY = 0.25  # JetStream briefly unavailable (503): send again after this


class Publisher:
    """Outgoing buffer, writer coroutine and JetStream ack tracking.

    Args:
        jetstream: every publish waits for a JetStream ack (JetStream mode).
        config: buffer bound and timeout.
        large: the large-frame stream the writer stores big payloads in.
        where: the servers, for messages.
        state: the connection's state in words, for messages.
    """

    def __init__(
        self,
        jetstream: bool,
        config: PublishConfig,
        large: LargeFrames,
        where: str,
        state: Callable[[], str],
    ) -> None:
        self.jetstream = jetstream
        self.buffer_bytes = config.buffer_bytes
        self.timeout = config.timeout
        self._large = large
        self._where = where
        self._state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nc: Any = None
        self._wire: Wire | None = None
        self.resend_after = max(2.0, min(self.timeout / 2, 5.0))
        self._cond = threading.Condition(threading.Lock())
        self._buf: list[Any] = []
        self._buf_plain = True  # the buffer holds only protocol bytes (no frames, no acks to track)
        self._buf_bytes = 0
        self._buf_msgs = 0
        # Sent and awaiting a JetStream ack: these count against buffer_bytes too,
        # since they are resent after a reconnect (and held until acknowledged).
        self._sent_bytes = 0
        self._room_waiters = 0
        self._idle = True  # the writer is waiting for a wake-up
        self._wake: asyncio.Event | None = None
        self._closing = False
        self._error: MsightError | None = None
        self._sent: dict[int, Tracked] = {}
        self._commands = Commands()
        self._ack_sub: Any = None
        self._prefixes: dict[str, bytes] = {}
        self.published = 0
        self.confirmed = 0  # core NATS: handed over before the last PONG
        self.possibly_lost = 0
        self.acked = 0
        self.resent = 0
        self.failed = 0
        self.retried = 0  # sends repeated because JetStream was briefly unavailable
        self.frames = 0
        self._retry_ids: list[int] = []

    # -- caller side (any thread) -------------------------------------------------

    def publish(self, name: str, data: bytes, max_payload: int) -> None:
        size = len(data)
        if self.jetstream:
            item: Any = self._commands.tracked(name, data, size)
            if item.size > max_payload:  # the header counts against max_payload
                item = Frame(name, data)
            self._put(item, size)
            return
        if size > max_payload:
            self._put(Frame(name, data), size)
            return
        prefix = self._prefixes.get(name)
        if prefix is None:
            prefix = self._prefixes[name] = b"PUB " + name.encode() + b" "
        head = b"%s%d\r\n" % (prefix, size)
        with self._cond:
            if self._error is not None:
                self._raise_error()
            held = self._buf_bytes + self._sent_bytes
            if held and held + size > self.buffer_bytes:
                self._wait_for_room(size)
            if size < _DIRECT_BYTES:
                self._buf += (head, data, CRLF)
            else:
                self._buf.append((head, data, CRLF))  # one piece: see emit.emit
            self._buf_msgs += 1
            self._buf_bytes += size
            if self._idle:
                self._kick()

    def send_raw(self, command: bytes) -> None:
        """Queue a protocol command (an ack) behind what is already queued."""
        with self._cond:
            if self._closing:
                raise ClosedError("NATS publisher is closed")
            self._buf.append(command)
            if self._idle:
                self._kick()

    def _put(self, item: Any, size: int) -> None:
        with self._cond:
            if self._error is not None:
                self._raise_error()
            held = self._buf_bytes + self._sent_bytes
            if held and held + size > self.buffer_bytes:
                self._wait_for_room(size)
            self._buf_plain = False
            self._buf.append(item)
            self._buf_msgs += 1
            self._buf_bytes += size
            if self._idle:
                self._kick()

    def _kick(self) -> None:
        # Called with the lock held, only when the writer is idle: one loop wake-up
        # per batch, not per message.
        wake = self._wake
        if wake is None:
            return  # not connected yet: the writer starts with a full buffer
        self._idle = False
        try:
            self._loop.call_soon_threadsafe(wake.set)  # type: ignore[union-attr]
        except RuntimeError:  # loop closed under us (close() racing publish())
            self._idle = True

    def _raise_error(self) -> None:
        exc, self._error = self._error, None
        assert exc is not None
        raise exc

    def _wait_for_room(self, size: int) -> None:
        # Called with the lock held.
        deadline = time.monotonic() + self.timeout
        self._room_waiters += 1
        try:
            while True:
                held = self._buf_bytes + self._sent_bytes
                if not held or held + size <= self.buffer_bytes:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closing:
                    raise BackpressureError(
                        f"NATS publish buffer full ({self._buf_bytes} bytes unsent and "
                        f"{self._sent_bytes} sent but unacknowledged for {self._where}, "
                        f"bound {self.buffer_bytes}) for {self.timeout:g}s; {self._state()}"
                    )
                self._cond.wait(remaining)
        finally:
            self._room_waiters -= 1

    def pending(self) -> tuple[int, int]:
        """Messages not yet handed to nats-py, and messages awaiting a JetStream ack."""
        with self._cond:
            return self._buf_msgs, len(self._sent)

    def wait_drained(self, timeout: float) -> None:
        """Block until the buffer is empty and every tracked message is acked.

        Raises:
            BackpressureError: not drained within ``timeout`` seconds.
            PublishError: an accepted message was refused by the broker.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._buf or not self._idle or self._sent:
                if self._error is not None:
                    self._raise_error()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BackpressureError(
                        f"flush timed out: {self._buf_msgs} message(s) not yet sent and "
                        f"{len(self._sent)} not yet acknowledged by NATS at "
                        f"{self._where}; {self._state()}"
                    )
                self._cond.wait(min(remaining, 0.5))
            if self._error is not None:
                self._raise_error()

    def start(self, nc: Any) -> None:
        """Called on the loop once ``nc`` is connected: create the writer."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._nc = nc
        self._wire = Wire(nc, self.timeout)
        self._wake = asyncio.Event()
        loop.create_task(self._run(), name="msight-nats-writer")
        loop.create_task(self._check_acks(), name="msight-nats-acks")
        if not self.jetstream:
            loop.create_task(self._confirm(), name="msight-nats-confirm")
        with self._cond:
            self._idle = False
            self._wake.set()

    def begin_close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    # -- loop side ----------------------------------------------------------------

    def wake(self) -> None:
        """On the loop: run the writer (after a reconnect)."""
        if self._wake is not None:
            with self._cond:
                self._idle = False
            self._wake.set()

    def requeue_unacked(self, older_than: float | None = None) -> int:
        """On the loop: put sent-but-unacknowledged messages back at the front."""
        now = time.monotonic()
        with self._cond:
            late = [
                t for t in self._sent.values() if older_than is None or now - t.sent_at > older_than
            ]
            self._requeue(late)
            self.resent += len(late)
        if late:
            self.wake()
        return len(late)

    def _requeue(self, items: list[Tracked]) -> None:
        # Called with the lock held: ``items`` leave ``_sent`` for the buffer's front.
        if not items:
            return
        items.sort(key=lambda t: t.id)
        for item in items:
            del self._sent[item.id]
            self._sent_bytes -= item.size
        self._buf[:0] = items
        self._buf_plain = False
        self._buf_msgs += len(items)
        self._buf_bytes += sum(t.size for t in items)

    def _retry_later(self, item: Tracked) -> None:
        """On the loop, lock held: send ``item`` again shortly (it stays unacked)."""
        item.sent_at = time.monotonic()  # not "late" for requeue_unacked meanwhile
        self.retried += 1
        if not self._retry_ids:
            self._loop.call_later(_RETRY_DELAY, self._retry_due)  # type: ignore[union-attr]
        self._retry_ids.append(item.id)

    def _retry_due(self) -> None:
        with self._cond:
            ids, self._retry_ids = self._retry_ids, []
            self._requeue([self._sent[i] for i in dict.fromkeys(ids) if i in self._sent])
        self.wake()

    async def _run(self) -> None:
        assert self._wake is not None and self._wire is not None
        wire = self._wire
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                nc = self._nc
                if nc is None or not nc.is_connected:
                    break  # the reconnected callback wakes us again
                with self._cond:
                    batch, count, plain = self._buf, self._buf_msgs, self._buf_plain
                    if not batch:
                        self._idle = True
                        self._cond.notify_all()
                        break
                    self._buf, self._buf_msgs, self._buf_bytes = [], 0, 0
                    self._buf_plain = True
                    self._cond.notify_all()
                try:
                    if plain:  # only ready-made protocol bytes: hand them over as they are
                        await emit(wire, batch)
                    else:
                        await self._send(nc, wire, batch)
                except Exception as exc:
                    logger.warning("NATS writer: sending a batch failed (%s)", type(exc).__name__)
                    logger.debug("NATS writer failure", exc_info=True)
                self.published += count

    async def _send(self, nc: Any, wire: Wire, batch: list[Any]) -> None:
        out: list[Any] = []
        size = 0
        now = time.monotonic()
        sent = self._sent
        for item in batch:
            kind = type(item)
            if kind is bytes:
                out.append(item)
                size += len(item)
                continue
            if kind is tuple:  # a large plain message (see publish)
                out.append(item)
                size += len(item[1])
                continue
            if kind is Frame:
                pieces = await self._expand_frame(nc, item)
            else:
                pieces = [item]
            for piece in pieces:
                if type(piece) is bytes or type(piece) is tuple:  # tuple: a core frame
                    out.append(piece)
                    size += len(piece) if type(piece) is bytes else frame_bytes(piece)
                    continue
                if self._ack_sub is None:
                    await self._subscribe_acks(nc)
                piece.sent_at = now
                if not piece.first_sent:
                    piece.first_sent = now
                with self._cond:
                    sent[piece.id] = piece
                    self._sent_bytes += piece.size
                if piece.size < _DIRECT_BYTES:
                    out.extend(piece.pieces)
                else:
                    out.append(tuple(piece.pieces))
                size += piece.size
                if size >= _EMIT_BYTES:
                    await emit(wire, out)
                    out, size = [], 0
            if size >= _EMIT_BYTES:
                await emit(wire, out)
                out, size = [], 0
        if out:
            await emit(wire, out)

    async def _expand_frame(self, nc: Any, frame: Frame) -> list[Any]:
        """Chunks (on a side subject, or into the large-frame stream), then the notice."""
        large = self._large
        if not self.jetstream:  # core NATS: one piece for the writer (chunks.py)
            self.frames += 1
            return [await large.core_frame(nc, frame.name, frame.data, self._answer)]
        stream = await large.ensure_stream(nc)
        pieces = self._commands.frame(
            frame, stream, large.chunk_size(nc.max_payload), tracked_notice=self.jetstream
        )
        self.frames += 1
        return pieces

    async def _answer(self, piece: Any) -> None:
        """A frame request's answer: written now, between the writer's messages."""
        await emit(self._wire, [piece])  # type: ignore[arg-type]

    async def _subscribe_acks(self, nc: Any) -> None:
        self._ack_sub = await nc.subscribe(
            self._commands.ack_prefix + "*",
            cb=self._on_ack,
            pending_msgs_limit=1_000_000,
            pending_bytes_limit=256 * 1024 * 1024,
        )

    async def _on_ack(self, msg: Any) -> None:
        ident = self._commands.ack_id(msg.subject)
        if ident is None:
            return
        data = msg.data
        headers = msg.headers
        # 503: no stream answered (a replicated stream electing a leader, a server
        # still recovering its streams, or no stream at all). Sent again until the
        # publish timeout has passed since the first send; then it is an error.
        unavailable = (headers is not None and headers.get("Status") == "503") or (
            b'"code":503' in data
        )
        failed = unavailable or b'"error"' in data
        with self._cond:
            item = self._sent.get(ident)
            if item is None:
                return  # a duplicate ack after a resend
            if unavailable and time.monotonic() - item.first_sent < self.timeout:
                self._retry_later(item)
                return
            del self._sent[ident]
            self._sent_bytes -= item.size
            if self._room_waiters:
                self._cond.notify_all()
            if not failed:
                self.acked += 1
            else:
                self.failed += 1
                why = "no stream answered" if not data else data.decode(errors="replace")[:200]
                if unavailable:
                    why += f" for {self.timeout:g}s"
                self._error = PublishError(
                    f"NATS JetStream did not store a message for {item.what!r}: {why}"
                )
            if not self._sent:
                self._cond.notify_all()
        if failed:
            logger.error(
                "NATS JetStream refused a message on %r (%d refused so far)", item.what, self.failed
            )

    async def _confirm(self) -> None:
        """Core NATS: a PING after new traffic, so a disconnect knows what is at risk.

        The server handles one connection's commands in order: once the PONG is
        back, every message handed over before the PING reached the server.
        """
        while True:
            await asyncio.sleep(_CONFIRM_INTERVAL)
            nc = self._nc
            handed = self.published
            if nc is None or not nc.is_connected or handed <= self.confirmed:
                continue
            try:
                await nc.flush(max(self.timeout, 1.0))
            except Exception as exc:  # noqa: BLE001 - a disconnect is counted by lost_connection()
                logger.debug("confirming PING failed: %s", type(exc).__name__)
                continue
            self.confirmed = max(self.confirmed, handed)

    def lost_connection(self) -> int:
        """On the loop, at a disconnect: count messages the server may not have got.

        Core NATS only; in JetStream mode what is not acknowledged is resent.
        """
        if self.jetstream:
            return 0
        at_risk = max(self.published - self.confirmed, 0)
        self.confirmed = self.published
        self.possibly_lost += at_risk
        return at_risk

    def reconnected(self) -> int:
        """On the loop, at a reconnect: resend what awaits an ack, send the buffer.

        Returns:
            Core NATS: the buffered messages sent now. Subscribers on other
            connections may not have resubscribed yet, so these are at risk too
            (core NATS keeps nothing for absent subscribers).
        """
        self._large.reset()  # the server may have lost the (in-memory) chunk stream
        backlog = 0
        if not self.jetstream:
            with self._cond:
                backlog = self._buf_msgs
            self.possibly_lost += backlog
        self.requeue_unacked()
        self.wake()
        return backlog

    async def _check_acks(self) -> None:
        while True:
            await asyncio.sleep(_ACK_CHECK_INTERVAL)
            nc = self._nc
            if nc is None or not nc.is_connected or not self._sent:
                continue
            count = self.requeue_unacked(self.resend_after)
            if count:
                logger.warning(
                    "no JetStream ack after %.1fs: resending %d message(s)",
                    self.resend_after,
                    count,
                )
