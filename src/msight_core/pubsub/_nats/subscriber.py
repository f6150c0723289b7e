"""The NATS backend's receiving side, :class:`Subscriber` (not public API).

Received plain messages go from the protocol parser (:mod:`.parser`, installed
on the client before it connects) straight into the backend's receive queue, a
batch per loop iteration; JetStream deliveries take the same route with their
ack subject. Messages whose headers matter (large-frame notices, JetStream
status messages) take nats-py's subscription callback, where a notice is
resolved into its frame (:class:`.frames.LargeFrames`); in core mode without a
group each topic's chunk subject is subscribed too, its chunks routed straight
to the assembler (:mod:`.chunks`). Without the parser
(nats-py's internals differ, or the public path is forced) every message takes
the callback.

What differs between core NATS and JetStream mode (how a topic is subscribed,
what acknowledges a delivery) is the mode's (:mod:`.modes`).

With ``MSIGHT_QUEUE_OVERFLOW=block`` the receive queue's put waits for room,
which must never happen on the event loop (it would stall the instance's
publishes, acknowledgements and PING answers). Deliveries then go through a
:class:`HandOff`: a thread of its own does the waiting put, and once it holds
:data:`HANDOFF_BYTES` or :data:`HANDOFF_MESSAGES` the parser stops reading the
socket until it has room again (``FastParser.throttle``), so the server is held
back by TCP, and memory stays bounded. (A server that cannot write to a
subscriber for long enough disconnects it as a slow consumer: blocking trades
that risk for no drops in the client.)
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from ...errors import PermissionDeniedError
from ...tracing import TRACE_HEADERS
from .._core import Delivery
from . import internals
from .chunks import CHUNK_PREFIX
from .frames import FRAME_HEADER, FRAME_MARKER, LargeFrames
from .parser import FastParser
from .routes import header_values

__all__ = [
    "HANDOFF_BYTES",
    "HANDOFF_MESSAGES",
    "HandOff",
    "LoopHandOff",
    "SubscribeMode",
    "Subscriber",
]

logger = logging.getLogger("msight_core.pubsub.nats")

HANDOFF_BYTES = 16 * 1024 * 1024
"""BLOCK mode: bytes waiting for queue room before the socket is no longer read."""
HANDOFF_MESSAGES = 10_000
"""BLOCK mode: messages waiting for queue room before the socket is no longer read."""


class SubscribeMode(Protocol):
    """What the subscriber needs from the mode (core NATS or JetStream)."""

    acknowledges: bool
    chunks: bool
    """Subscribe the side subject of large frames' chunks too (core broadcast)."""

    def subscribe(
        self, nc: Any, name: str, cb: Callable[[Any], Awaitable[None]]
    ) -> Awaitable[tuple[Any, tuple[int, int] | None]]:
        """Subscribe ``name``; the subscription and its direct-route key, if any."""
        ...

    def token(self, reply: str) -> Any:
        """What acknowledges a delivery with this reply subject."""
        ...

    def lost_frame(self, reply: str) -> None:
        """A frame notice whose chunks are gone (acknowledge it, say)."""
        ...


class HandOff:
    """Puts batches into a queue whose put may block, from a thread of its own.

    :meth:`put` (on the loop) never blocks; :meth:`room` (on the loop) returns
    once fewer than the bounds wait, after :meth:`put` went over them.

    Args:
        put_many: the queue's put; may block until the queue has room.
        max_bytes, max_messages: what may wait before :meth:`room` waits.
    """

    def __init__(
        self,
        put_many: Callable[[list[Delivery]], Any],
        max_bytes: int = HANDOFF_BYTES,
        max_messages: int = HANDOFF_MESSAGES,
    ) -> None:
        self._put_many = put_many
        self._max_bytes = max_bytes
        self._max_messages = max_messages
        self._loop = asyncio.get_running_loop()
        self._open = asyncio.Event()
        self._open.set()
        self._cond = threading.Condition(threading.Lock())
        self._batches: deque[tuple[list[Delivery], int]] = deque()
        self.bytes = 0
        self.messages = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="msight-nats-handoff", daemon=True)
        self._thread.start()

    def put(self, batch: list[Delivery]) -> None:
        """Queue ``batch`` behind the others (on the loop; never blocks)."""
        size = sum(len(item.data) for item in batch)
        with self._cond:
            self._batches.append((batch, size))
            self.bytes += size
            self.messages += len(batch)
            full = self.bytes >= self._max_bytes or self.messages >= self._max_messages
            self._cond.notify()
        if full:
            self._open.clear()

    async def room(self) -> None:
        """Return when :meth:`put` may be called again (on the loop)."""
        if not self._open.is_set():
            await self._open.wait()

    def close(self) -> None:
        """Stop the thread once the queue refuses (it is closed) or all is put."""
        with self._cond:
            self._closed = True
            self._batches.clear()
            self._cond.notify()
        self._set_open()

    def _set_open(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._open.set)
        except RuntimeError:  # the loop is closed
            pass

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._batches and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch, size = self._batches[0]
            try:
                self._put_many(batch)  # waits for room in the receive queue
            except Exception:  # pragma: no cover - the queue does not raise
                logger.exception("NATS hand-off: queueing a batch failed")
            with self._cond:
                if self._batches and self._batches[0][0] is batch:
                    self._batches.popleft()
                    self.bytes -= size
                    self.messages -= len(batch)
                reopen = (
                    not self._open.is_set()
                    and self.bytes < self._max_bytes // 2
                    and self.messages < self._max_messages // 2
                )
            if reopen:
                self._set_open()


class LoopHandOff:
    """:class:`HandOff` without a thread, for a receive queue read on the same loop.

    :meth:`put` moves what fits into the queue (``offer``: never waits, never
    drops) and keeps the rest; :meth:`room` waits, polling every millisecond
    while the queue is full (the consumer takes on this loop, without telling
    us), until everything kept is queued.
    """

    POLL = 0.001

    def __init__(self, offer: Callable[[deque[Delivery]], None]) -> None:
        self._offer = offer
        self._kept: deque[Delivery] = deque()

    def put(self, batch: list[Delivery]) -> None:
        kept = self._kept
        kept.extend(batch)
        self._offer(kept)

    async def room(self) -> None:
        kept = self._kept
        while kept:
            await asyncio.sleep(self.POLL)
            self._offer(kept)  # empties ``kept`` once the queue is closed

    def close(self) -> None:
        self._kept.clear()


class Subscriber:
    """Subscriptions of one backend and the feed of its receive queue.

    Args:
        mode: how topics are subscribed and deliveries acknowledged.
        large: reads large frames back.
        deliver: puts deliveries, in order, into the receive queue.
        timeout: seconds to wait for the server to confirm a subscription.
        blocking: ``deliver`` may wait for room (``MSIGHT_QUEUE_OVERFLOW=block``):
            it is called from a :class:`HandOff` thread, never on the loop.
        offer: with ``blocking``, the queue's ``offer`` when the queue is read on
            this loop (the asyncio backend): a :class:`LoopHandOff` then waits
            for room on the loop, without a thread.
    """

    def __init__(
        self,
        mode: SubscribeMode,
        large: LargeFrames,
        deliver: Callable[[list[Delivery]], Any],
        timeout: float,
        blocking: bool = False,
        offer: Callable[[deque[Delivery]], None] | None = None,
    ) -> None:
        self._mode = mode
        self._offer = offer
        self._large = large
        self._queue_put = deliver
        self._put_many = deliver
        self._blocking = blocking
        self._handoff: HandOff | LoopHandOff | None = None
        self._timeout = timeout
        self._nc: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._parser: FastParser | None = None
        self._subs: dict[str, Any] = {}
        self._side: dict[str, Any] = {}  # the chunk subscriptions of large frames
        self._inbox: list[Delivery] = []
        self._inbox_scheduled = False
        self._direct = self._deliver_acked if mode.acknowledges else self._deliver

    def topics(self) -> Iterable[str]:
        """The subscribed topics."""
        return list(self._subs)

    # -- on the loop --------------------------------------------------------------

    def attach(self, nc: Any) -> None:
        """A client about to connect: give it the fast parser if it takes one."""
        self._nc = nc
        self._loop = asyncio.get_running_loop()
        parser = self._parser = internals.install_parser(nc, FastParser)
        if self._blocking and self._handoff is None:
            handoff: HandOff | LoopHandOff
            if self._offer is not None:
                handoff = LoopHandOff(self._offer)
            else:
                handoff = HandOff(self._queue_put)
            self._handoff = handoff
            self._put_many = handoff.put
            if parser is not None:
                parser.throttle = self._room

    async def _room(self) -> None:
        """The parser's throttle in BLOCK mode: what it parsed goes to the hand-off
        now, then wait until the hand-off has room."""
        self._flush_inbox()
        assert self._handoff is not None
        await self._handoff.room()

    def close(self) -> None:
        """The receive queue is closed: stop the hand-off thread (if any)."""
        if self._handoff is not None:
            self._handoff.close()

    @property
    def dropped(self) -> int:
        """Well-framed messages the parser could not hand over."""
        return self._parser.dropped if self._parser is not None else 0

    async def subscribe(self, name: str) -> None:
        """Subscribe ``name``; returns once the server has the subscription.

        Raises:
            PermissionDeniedError: the server's permissions refuse the subject
                (or, on core NATS, its large-frame chunk subject).
        """
        nc = self._nc
        before = nc.last_error  # the server reports a refusal as -ERR, before the PONG
        sub, key = await self._mode.subscribe(nc, name, self._on_message)
        self._subs[name] = sub
        parser = self._parser
        if parser is not None:
            # The server's own bound on a message, if above the parser's default.
            parser.max_size = max(parser.max_size, int(nc.max_payload) + 64 * 1024)
        if parser is not None and key is not None:
            sid, delivered = key
            # Plain messages skip nats-py's Msg object, queue and task (parser.py),
            # unless one already took that path: routing the next ones could overtake it.
            if not delivered:
                parser.route(sid, self._direct, FRAME_MARKER)
        if self._mode.chunks and name not in self._side:
            await self._subscribe_chunks(nc, name)
        await internals.confirm(nc, self._timeout)  # the server has the SUBs now
        error = nc.last_error
        if error is not None and error is not before:
            await self._refused(name, str(error))

    async def _refused(self, name: str, error: str) -> None:
        """Raise if ``error`` (nats-py's last) refuses a subscription just made."""
        if "permissions violation for subscription" not in error.lower():
            return
        # nats-py lowercases the server's text.
        refused = [s for s in (name, CHUNK_PREFIX + name) if f'"{s.lower()}"' in error.lower()]
        if not refused:
            return
        for sub in (self._subs.pop(name, None), self._side.pop(name, None)):
            if sub is not None:
                await sub.unsubscribe()  # the server never had it: no deliveries
        raise PermissionDeniedError(
            f"NATS refused the subscription to {refused[0]!r}: the user's permissions do "
            "not allow subscribing to it (see docs/guides/security.md for the subjects "
            "msight needs)"
        )

    async def _subscribe_chunks(self, nc: Any, name: str) -> None:
        """Core broadcast: large frames' chunks come on a side subject, before
        their notice (:mod:`.chunks`); they go to the assembler, routed directly."""
        assembler = self._large.assembler
        self._large.confirm_on(nc)

        async def on_chunk(msg: Any) -> None:  # nats-py's path (no parser)
            assembler.on_chunk(msg.subject, msg.data)

        side = self._side[name] = await nc.subscribe(
            CHUNK_PREFIX + name,
            cb=on_chunk,
            pending_msgs_limit=100_000,
            pending_bytes_limit=512 * 1024 * 1024,
        )
        key = internals.core_route(side)
        if self._parser is not None and key is not None:
            self._parser.route(key[0], assembler.on_chunk, views=True)  # type: ignore[arg-type]

    async def drain(self) -> None:
        """Stop deliveries: UNSUB, a round trip, and the callback sees what came before."""
        subs = list(self._subs.values()) + list(self._side.values())
        self._subs.clear()
        self._side.clear()
        for sub in subs:
            await sub.drain()

    def route_done(self, sid: int) -> None:
        """A message of subscription ``sid`` that took nats-py's path is handled
        (or was dropped): the parser may route the next ones directly again."""
        route = self._parser.routes.get(sid) if self._parser is not None else None
        if route is not None:
            route.done()

    def _deliver(self, subject: str, data: bytes, reply: bytes, headers: bytes | None) -> None:
        """A routed plain message, straight from the parser (``headers``: its header
        block if it carries trace context)."""
        trace = header_values(headers, TRACE_HEADERS) if headers else None
        self._collect(Delivery(subject, data, None, trace))

    def _deliver_acked(
        self, subject: str, data: bytes, reply: bytes, headers: bytes | None
    ) -> None:
        """A routed delivery to acknowledge; ``reply`` is its ack subject."""
        trace = header_values(headers, TRACE_HEADERS) if headers else None
        self._collect(Delivery(subject, data, self._mode.token(reply.decode()), trace))

    def _collect(self, delivery: Delivery) -> None:
        # Collect what arrives in this loop iteration and queue it in one go: one
        # lock and one wake-up of the application thread per batch.
        self._inbox.append(delivery)
        if not self._inbox_scheduled:
            self._inbox_scheduled = True
            self._loop.call_soon(self._flush_inbox)  # type: ignore[union-attr]

    def _flush_inbox(self) -> None:
        self._inbox_scheduled = False
        if self._inbox:
            batch, self._inbox = self._inbox, []
            self._put_many(batch)

    async def _on_message(self, msg: Any) -> None:
        try:
            await self._handle(msg)
        finally:
            self.route_done(msg.sid)
        handoff = self._handoff
        if handoff is not None and self._parser is None:
            # nats-py's path: this subscription's task waits (its pending limits apply).
            await self._room()

    async def _handle(self, msg: Any) -> None:
        headers = msg.headers
        mode = self._mode
        if headers and FRAME_HEADER in headers:
            self._flush_inbox()  # keep order: what came before the frame goes first
            data = await self._large.fetch(self._nc, msg.subject, headers)
            if data is None:
                mode.lost_frame(msg.reply)
                return
            self._put_many([Delivery(msg.subject, data, mode.token(msg.reply), headers)])
            return
        self._collect(Delivery(msg.subject, msg.data, mode.token(msg.reply), headers))
