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
from ...errors import BackpressureError, ClosedError, MsightError
from .acks import Receipts
from .commands import CRLF, Commands, Frame, Tracked, hpub_head
from .emit import Paced, emit, frame_bytes
from .frames import LargeFrames
from .internals import Wire

__all__ = ["Publisher"]

logger = logging.getLogger("msight_core.pubsub.nats")

_EMIT_BYTES = 8 * 1024 * 1024  # a batch of tracked messages is handed over in such steps
_DIRECT_BYTES = 128 * 1024  # payloads from this size are handed over without a copy
_HANDED_OVER = (bytes, tuple, Paced)  # what _expand_frame gives that goes to emit() as it is


class Publisher(Receipts):
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
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # publish() takes the bare lock: faster
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
        self._loop_thread = 0  # the writer's loop's thread
        self._tasks: list[asyncio.Task[None]] = []
        self._changed: asyncio.Event | None = None  # set on the loop when room was made
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

    def publish(
        self, name: str, data: bytes, max_payload: int, lines: bytes = b"", wait: bool = True
    ) -> bool:
        """Queue ``data`` for ``name`` (``lines``: header lines, trace context).

        Waits for room up to the timeout, or with ``wait=False`` returns ``False``
        at once (nothing queued) where it would wait: the loop's caller waits
        with :meth:`settle` instead.
        """
        size = len(data)
        if self.jetstream:
            item: Any = self._commands.tracked(name, data, size, lines)
            if item.size > max_payload:  # the header counts against max_payload
                item = Frame(name, data, lines)
            return self._put(item, size, wait)
        if size + len(lines) + 16 > max_payload if lines else size > max_payload:
            return self._put(Frame(name, data, lines), size, wait)
        if lines:  # an HPUB: the header block goes with the head
            head = hpub_head(name, size, lines)
        else:
            prefix = self._prefixes.get(name)
            if prefix is None:
                prefix = self._prefixes[name] = b"PUB " + name.encode() + b" "
            head = b"%s%d\r\n" % (prefix, size)
        with self._lock:
            if self._error is not None:
                self._raise_error()
            held = self._buf_bytes + self._sent_bytes
            if held and held + size > self.buffer_bytes:
                if not wait:
                    return False
                self._wait_for_room(size)
            if size < _DIRECT_BYTES:
                self._buf += (head, data, CRLF)
            else:
                self._buf.append((head, data, CRLF))  # one piece: see emit.emit
            self._buf_msgs += 1
            self._buf_bytes += size
            if self._idle:
                self._kick()
        return True

    def send_raw(self, command: bytes) -> None:
        """Queue a protocol command (an ack) behind what is already queued."""
        with self._cond:
            if self._closing:
                raise ClosedError("NATS publisher is closed")
            self._buf.append(command)
            if self._idle:
                self._kick()

    def _put(self, item: Any, size: int, wait: bool) -> bool:
        with self._cond:
            if self._error is not None:
                self._raise_error()
            held = self._buf_bytes + self._sent_bytes
            if held and held + size > self.buffer_bytes:
                if not wait:
                    return False
                self._wait_for_room(size)
            self._buf_plain = False
            self._buf.append(item)
            self._buf_msgs += 1
            self._buf_bytes += size
            if self._idle:
                self._kick()
        return True

    def _kick(self) -> None:
        # Called with the lock held, only when the writer is idle: one loop wake-up
        # per batch, not per message.
        wake = self._wake
        if wake is None:
            return  # not connected yet: the writer starts with a full buffer
        self._idle = False
        if threading.get_ident() == self._loop_thread:
            wake.set()  # on the writer's loop (the asyncio backend): no self-pipe write
            return
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
        self._loop_thread = threading.get_ident()
        self._nc = nc
        self._wire = Wire(nc, self.timeout)
        self._wake = asyncio.Event()
        tasks = [loop.create_task(self._run(), name="msight-nats-writer")]
        tasks.append(loop.create_task(self._check_acks(), name="msight-nats-acks"))
        if not self.jetstream:
            tasks.append(loop.create_task(self._confirm(), name="msight-nats-confirm"))
        self._tasks = tasks
        with self._cond:
            self._idle = False
            self._wake.set()

    def begin_close(self) -> None:
        with self._cond:
            self._closing = True
            self._signal()

    def stop(self) -> None:
        """On the loop, after the client closed: end the writer's tasks (a loop that
        goes on, the asyncio backend's, would keep them)."""
        for task in self._tasks:
            task.cancel()

    # -- waiting on the loop (the asyncio backend) --------------------------------

    def _signal(self) -> None:
        # Lock held, on the loop: room was made, or the writer went idle.
        self._cond.notify_all()
        changed = self._changed
        if changed is not None:
            changed.set()

    def _has_room(self, size: int) -> bool:
        held = self._buf_bytes + self._sent_bytes
        return not held or held + size <= self.buffer_bytes or self._closing

    def _is_drained(self) -> bool:
        return (not self._buf and self._idle and not self._sent) or self._error is not None

    async def settle(self, size: int | None, timeout: float) -> None:
        """On the writer's loop: wait until ``size`` more bytes fit (``None``: until
        everything is sent and acknowledged), without blocking the loop.

        Raises:
            BackpressureError: not so within ``timeout`` seconds.
            PublishError: an accepted message was refused by the broker.
        """
        ready = self._is_drained if size is None else lambda: self._has_room(size)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not ready():
            remaining = deadline - loop.time()
            if remaining <= 0:
                what = "flush" if size is None else "NATS publish buffer full:"
                raise BackpressureError(
                    f"{what} {self._buf_msgs} message(s) not yet sent and {len(self._sent)} "
                    f"not yet acknowledged by NATS at {self._where} after {timeout:g}s; "
                    f"{self._state()}"
                )
            changed = self._changed
            if changed is None:
                changed = self._changed = asyncio.Event()
            changed.clear()
            try:  # a bounded wait: the next look comes at the latest 0.1 s later
                await asyncio.wait_for(changed.wait(), min(remaining, 0.1))
            except asyncio.TimeoutError:
                pass
        if size is None and self._error is not None:
            with self._cond:
                if self._error is not None:
                    self._raise_error()

    # -- loop side ----------------------------------------------------------------

    def wake(self) -> None:
        """On the loop: run the writer (after a reconnect)."""
        if self._wake is not None:
            with self._cond:
                self._idle = False
            self._wake.set()

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
                        self._signal()
                        break
                    self._buf, self._buf_msgs, self._buf_bytes = [], 0, 0
                    self._buf_plain = True
                    self._signal()
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
                if type(piece) in _HANDED_OVER:  # bytes, or a core frame's pieces
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
            pieces = await large.core_frame(nc, frame.name, frame.data, self._answer)
            if large.flow.paced(frame.name):  # its subscribers pace it, else the server (.emit)
                return [Paced(pieces)]
            return [pieces]
        stream = await large.ensure_stream(nc)
        pieces = self._commands.frame(
            frame, stream, large.chunk_size(nc.max_payload), tracked_notice=self.jetstream
        )
        self.frames += 1
        return pieces

    async def _answer(self, piece: Any) -> None:
        """A frame request's answer: written now, between the writer's messages."""
        await emit(self._wire, [piece])  # type: ignore[arg-type]
