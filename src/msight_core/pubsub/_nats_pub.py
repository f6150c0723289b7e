"""The NATS publishing pipeline (not public API).

``publish()`` (any thread) formats the protocol command itself and appends it to
an outgoing buffer; a single writer coroutine on the backend's event loop moves
whatever has accumulated into nats-py's send buffer in one piece, in order. No
round trip and no loop hand-off per message: the loop is woken only when the
writer was idle.

Messages that need an acknowledgement from JetStream (JetStream-mode publishes
and the chunks of large frames) carry a reply subject under a private inbox and a
``Nats-Msg-Id``; they stay in ``_sent`` until the stream acknowledges them, and
are sent again after a reconnect or when the ack is late. The stream drops the
duplicates by message id, so a resend never stores a message twice.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from ..errors import BackpressureError, ClosedError, MsightError, PublishError

if TYPE_CHECKING:
    from .nats import NATSPubSub

__all__ = ["FRAME_HEADER", "LARGE_SUBJECT_PREFIX", "Publisher"]

logger = logging.getLogger("msight_core.pubsub.nats")

CRLF = b"\r\n"
FRAME_HEADER = "Msight-Frame"
LARGE_SUBJECT_PREFIX = "_msight.large."
_EMIT_BYTES = 8 * 1024 * 1024  # a batch of tracked messages is handed over in such steps
_EMIT_STEP = 4 * 1024 * 1024  # pending in nats-py before the writer waits for the socket
_DIRECT_BYTES = 128 * 1024  # payloads from this size are handed over without a copy
_ACK_CHECK_INTERVAL = 1.0
_CONFIRM_INTERVAL = 0.05  # core NATS: PING this often while messages flow
_RETRY_DELAY = 0.25  # JetStream briefly unavailable (503): send again after this


class _Tracked:
    """A command that waits for a JetStream acknowledgement."""

    __slots__ = ("first_sent", "id", "pieces", "sent_at", "size", "what")

    def __init__(self, ident: int, pieces: list[bytes], size: int, what: str) -> None:
        self.id = ident
        self.pieces = pieces
        self.size = size
        self.sent_at = 0.0
        self.first_sent = 0.0  # when first handed over: the retry budget starts there
        self.what = what


class _Frame:
    """A payload above ``max_payload``: chunked into JetStream by the writer."""

    __slots__ = ("data", "name", "size")

    def __init__(self, name: str, data: bytes) -> None:
        self.name = name
        self.data = data
        self.size = len(data)


class Publisher:
    """Outgoing buffer, writer coroutine and JetStream ack tracking."""

    def __init__(self, owner: NATSPubSub) -> None:
        self.owner = owner
        config = owner.config
        self.jetstream = config.jetstream
        self.buffer_bytes = config.publish.buffer_bytes
        self.timeout = config.publish.timeout
        self.resend_after = max(2.0, min(self.timeout / 2, 5.0))
        self._cond = threading.Condition(threading.Lock())
        self._buf: list[Any] = []
        self._buf_plain = True  # the buffer holds only protocol bytes (no frames, no acks to track)
        self._buf_bytes = 0
        self._buf_msgs = 0
        self._idle = True  # the writer is waiting for a wake-up
        self._wake: asyncio.Event | None = None
        self._closing = False
        self._error: MsightError | None = None
        self._sent: dict[int, _Tracked] = {}
        self._ids = itertools.count(1)
        token = uuid.uuid4().hex[:16]
        self._ack_prefix = f"_INBOX.msight{token}."
        self._ack_prefix_b = self._ack_prefix.encode()
        self._msgid_prefix = token.encode()
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
            item: Any = self._tracked(name, data, size)
            if item.size > max_payload:  # the header counts against max_payload
                item = _Frame(name, data)
            self._put(item, size)
            return
        if size > max_payload:
            self._put(_Frame(name, data), size)
            return
        prefix = self._prefixes.get(name)
        if prefix is None:
            prefix = self._prefixes[name] = b"PUB " + name.encode() + b" "
        head = b"%s%d\r\n" % (prefix, size)
        with self._cond:
            if self._error is not None:
                self._raise_error()
            if self._buf_bytes and self._buf_bytes + size > self.buffer_bytes:
                self._wait_for_room(size)
            if size < _DIRECT_BYTES:
                self._buf += (head, data, CRLF)
            else:
                self._buf.append((head, data, CRLF))  # one piece: see _emit
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

    def _tracked(self, name: str, data: bytes, size: int) -> _Tracked:
        ident = next(self._ids)
        hdr = b"NATS/1.0\r\nNats-Msg-Id: %s.%d\r\n\r\n" % (self._msgid_prefix, ident)
        head = b"HPUB %s %s%d %d %d\r\n" % (
            name.encode(),
            self._ack_prefix_b,
            ident,
            len(hdr),
            len(hdr) + size,
        )
        return _Tracked(ident, [head, hdr, data, CRLF], len(hdr) + size, name)

    def _put(self, item: Any, size: int) -> None:
        with self._cond:
            if self._error is not None:
                self._raise_error()
            if self._buf_bytes and self._buf_bytes + size > self.buffer_bytes:
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
            self.owner._loop.loop.call_soon_threadsafe(wake.set)
        except RuntimeError:  # loop closed under us (close() racing publish())
            self._idle = True

    def _raise_error(self) -> None:
        exc, self._error = self._error, None
        assert exc is not None
        raise exc

    def _wait_for_room(self, size: int) -> None:
        deadline = time.monotonic() + self.timeout
        while self._buf_bytes and self._buf_bytes + size > self.buffer_bytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closing:
                raise BackpressureError(
                    f"NATS publish buffer full ({self._buf_bytes} bytes pending for "
                    f"{self.owner.servers_shown}, bound {self.buffer_bytes}) for "
                    f"{self.timeout:g}s; {self.owner.connection_state}"
                )
            self._cond.wait(remaining)

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
                        f"{self.owner.servers_shown}; {self.owner.connection_state}"
                    )
                self._cond.wait(min(remaining, 0.5))
            if self._error is not None:
                self._raise_error()

    def start(self) -> None:
        """Called on the loop once connected: create the writer."""
        self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
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

    def _requeue(self, items: list[_Tracked]) -> None:
        # Called with the lock held: ``items`` leave ``_sent`` for the buffer's front.
        if not items:
            return
        items.sort(key=lambda t: t.id)
        for item in items:
            del self._sent[item.id]
        self._buf[:0] = items
        self._buf_plain = False
        self._buf_msgs += len(items)
        self._buf_bytes += sum(t.size for t in items)

    def _retry_later(self, item: _Tracked) -> None:
        """On the loop, lock held: send ``item`` again shortly (it stays unacked)."""
        item.sent_at = time.monotonic()  # not "late" for requeue_unacked meanwhile
        self.retried += 1
        if not self._retry_ids:
            self.owner._loop.loop.call_later(_RETRY_DELAY, self._retry_due)
        self._retry_ids.append(item.id)

    def _retry_due(self) -> None:
        with self._cond:
            ids, self._retry_ids = self._retry_ids, []
            self._requeue([self._sent[i] for i in dict.fromkeys(ids) if i in self._sent])
        self.wake()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                nc = self.owner._nc
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
                        await self._emit(nc, batch)
                    else:
                        await self._send(nc, batch)
                except Exception as exc:
                    logger.warning("NATS writer: sending a batch failed (%s)", type(exc).__name__)
                    logger.debug("NATS writer failure", exc_info=True)
                self.published += count

    async def _send(self, nc: Any, batch: list[Any]) -> None:
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
            if kind is _Frame:
                pieces = await self._expand_frame(nc, item)
            else:
                pieces = [item]
            for piece in pieces:
                if type(piece) is bytes:
                    out.append(piece)
                    size += len(piece)
                    continue
                if self._ack_sub is None:
                    await self._subscribe_acks(nc)
                piece.sent_at = now
                if not piece.first_sent:
                    piece.first_sent = now
                with self._cond:
                    sent[piece.id] = piece
                if piece.size < _DIRECT_BYTES:
                    out.extend(piece.pieces)
                else:
                    out.append(tuple(piece.pieces))
                size += piece.size
                if size >= _EMIT_BYTES:
                    await self._emit(nc, out)
                    out, size = [], 0
            if size >= _EMIT_BYTES:
                await self._emit(nc, out)
                out, size = [], 0
        if out:
            await self._emit(nc, out)

    async def _emit(self, nc: Any, out: list[Any]) -> None:
        """Hand ``out`` to the connection, in order.

        Runs of small pieces are joined into one command for nats-py's send
        buffer, written out by its flusher task. A tuple is one large message: on
        a TCP connection, nats-py's buffer is written out first and the message's
        pieces go straight to the asyncio transport, which sends what the socket
        takes and copies only the rest (nats-py's path would copy a 16 MB frame
        three times more). Nothing suspends between a message's pieces, so no
        other command can come between them; after each large message the
        writer waits until the transport's buffer has drained.
        """
        transport = getattr(nc, "_transport", None)
        direct = type(transport).__name__ == "TcpTransport"
        run: list[bytes] = []
        for piece in out:
            if type(piece) is not tuple:
                run.append(piece)
                continue
            if run:
                await nc._send_command(b"".join(run))
                run = []
            if direct:
                try:
                    self._write_through(nc, transport, piece)
                except Exception as exc:  # noqa: BLE001 - the connection is going down
                    logger.debug("direct NATS write refused: %s", type(exc).__name__)
                    direct = False  # this and the rest wait in nats-py's buffer
                else:
                    try:
                        await transport.drain()
                    except Exception as exc:  # noqa: BLE001 - lost with the connection
                        # Counted as at risk by the disconnect (lost_connection).
                        logger.debug("NATS connection lost while writing: %s", type(exc).__name__)
                        direct = False
                    continue
            for part in piece:
                # No suspension: client_options sets a pending_size never reached.
                await nc._send_command(part)
            if nc.pending_data_size >= _EMIT_STEP:
                await nc._flush_pending(force_flush=True)
        if run:
            await nc._send_command(b"".join(run))
        await nc._flush_pending(force_flush=nc.pending_data_size >= _EMIT_STEP)

    @staticmethod
    def _write_through(nc: Any, transport: Any, pieces: tuple[bytes, ...]) -> None:
        writer = getattr(transport, "_io_writer", None)
        if writer is None or writer.is_closing():
            raise ConnectionResetError("the NATS connection is closing")  # nothing written
        if nc._pending:  # what was queued before goes first
            transport.writelines(nc._pending)
            nc._pending = []
            nc._pending_data_size = 0
        for part in pieces:
            transport.write(memoryview(part))  # sliced, not copied, by a partial send

    async def _expand_frame(self, nc: Any, frame: _Frame) -> list[Any]:
        """Chunks into the large-frame stream, then the notice on the topic."""
        large = self.owner._large
        stream = await large.ensure_stream(nc)
        frame_id = f"{self._msgid_prefix.decode()}{next(self._ids)}"
        subject = (LARGE_SUBJECT_PREFIX + frame_id).encode()
        chunk = large.chunk_size(nc.max_payload)
        view = memoryview(frame.data)
        pieces: list[Any] = []
        count = 0
        for offset in range(0, frame.size, chunk):
            part = bytes(view[offset : offset + chunk])
            ident = next(self._ids)
            hdr = b"NATS/1.0\r\nNats-Msg-Id: %s.%d\r\n\r\n" % (subject, count)
            head = b"HPUB %s %s%d %d %d\r\n" % (
                subject,
                self._ack_prefix_b,
                ident,
                len(hdr),
                len(hdr) + len(part),
            )
            pieces.append(
                _Tracked(ident, [head, hdr, part, CRLF], len(hdr) + len(part), frame.name)
            )
            count += 1
        notice = (
            "NATS/1.0\r\n"
            f"{FRAME_HEADER}: {frame_id}\r\n"
            f"Msight-Frame-Size: {frame.size}\r\n"
            f"Msight-Frame-Chunks: {count}\r\n"
            f"Msight-Frame-Stream: {stream}\r\n"
        ).encode()
        name = frame.name.encode()
        if self.jetstream:
            ident = next(self._ids)
            hdr = notice + b"Nats-Msg-Id: %s.%d\r\n\r\n" % (self._msgid_prefix, ident)
            head = b"HPUB %s %s%d %d %d\r\n" % (
                name,
                self._ack_prefix_b,
                ident,
                len(hdr),
                len(hdr),
            )
            pieces.append(_Tracked(ident, [head, hdr, CRLF], len(hdr), frame.name))
        else:
            hdr = notice + CRLF
            pieces.append(b"HPUB %s %d %d\r\n%s\r\n" % (name, len(hdr), len(hdr), hdr))
        self.frames += 1
        return pieces

    async def _subscribe_acks(self, nc: Any) -> None:
        self._ack_sub = await nc.subscribe(
            self._ack_prefix + "*",
            cb=self._on_ack,
            pending_msgs_limit=1_000_000,
            pending_bytes_limit=256 * 1024 * 1024,
        )

    async def _on_ack(self, msg: Any) -> None:
        try:
            ident = int(msg.subject[len(self._ack_prefix) :])
        except ValueError:
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
            nc = self.owner._nc
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
        """On the loop, at a disconnect: count messages the server may not have got."""
        at_risk = max(self.published - self.confirmed, 0)
        self.confirmed = self.published
        self.possibly_lost += at_risk
        return at_risk

    def backlog_at_reconnect(self) -> int:
        """On the loop, at a reconnect: count the buffered messages sent now.

        Subscribers on other connections may not have resubscribed yet, so these
        are at risk too (core NATS keeps nothing for absent subscribers).
        """
        with self._cond:
            backlog = self._buf_msgs
        self.possibly_lost += backlog
        return backlog

    async def _check_acks(self) -> None:
        while True:
            await asyncio.sleep(_ACK_CHECK_INTERVAL)
            nc = self.owner._nc
            if nc is None or not nc.is_connected or not self._sent:
                continue
            count = self.requeue_unacked(self.resend_after)
            if count:
                logger.warning(
                    "no JetStream ack after %.1fs: resending %d message(s)",
                    self.resend_after,
                    count,
                )
