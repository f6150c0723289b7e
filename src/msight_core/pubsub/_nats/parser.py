"""A faster NATS protocol parser for the NATS backend's subscriptions (not public API).

nats-py parses every ``MSG`` by matching a regex at the start of its buffer,
deleting the consumed bytes (a memmove of the rest of the buffer), building a
``Msg`` object, queueing it to a per-subscription task and awaiting the
callback: about 13 µs of CPU per 1 KB message here, which caps a subscriber near
65k msg/s. :class:`FastParser` takes the place of the client's parser
(installed before connecting by :func:`.internals.install_parser`) and walks
the buffer by offset. For a subscription registered with
:meth:`FastParser.route`, a message goes straight to that route's
``deliver(subject, payload, reply, headers)`` function, skipping the ``Msg`` object, the
queue and the task. Headers are dropped on that path, so it takes only
messages without headers or with headers the receiver ignores (see
:meth:`Route.plain_headers`).

**Reading.** nats-py reads 32 KB at a time through an ``asyncio.StreamReader``
(which pauses the socket at 64 KB buffered): a 1 MB frame costs about 30 task
steps and four copies, so a subscriber drained ~370 MB/s, less than one
publisher on the same machine sends. Where :mod:`.internals` allows it, the
parser takes over the connection's reading after its first read
(:class:`~.receiver.Receiver`, an ``asyncio.BufferedProtocol``): the socket is read
straight into the parser's buffer (``recv_into``, as much as the kernel has),
and a payload is copied once, out of that buffer. The buffer grows to hold
the message being read, up to :attr:`FastParser.max_size`; when it is full the
socket is paused (``pause_reading``), which is also how a receiver that waits
for room (``throttle``) holds the server back.

Everything else goes to the client's own handlers (:class:`Hooks`, bound by
:mod:`.internals`): messages whose headers matter (status messages, large-frame
notices), other subscriptions, and the control lines. To keep order within a
routed subscription, once one of its messages took the client's path (a
large-frame notice, which has headers), the following ones take it too until
the callback has handled all of them (:meth:`Route.done`). Routed messages are
counted in the client's ``stats``, not in the subscription's ``delivered``.

**The server is checked, not trusted.** Every size and id on a ``MSG``/``HMSG``
line is bounded (digits, ``max_size``, header size within the total) before
anything is buffered for it; the CRLF after a payload must be there; a control
line is at most 4 KB and must be one the protocol has. A violation is a
:class:`~nats.errors.ProtocolError`, on which nats-py drops the connection and
reconnects, as nats-server's own clients do: after it nothing in the stream can
be trusted. A well-framed message that cannot be handled (a subject or reply
that is not UTF-8, headers nats-py cannot parse) is dropped and counted in
:attr:`FastParser.dropped`; the messages after it still arrive. Any other
exception while parsing becomes a ``ProtocolError`` too: nats-py's read loop
stops for good on anything else.

The parser implements the NATS client protocol
(https://docs.nats.io/reference/reference-protocols/nats-protocol); it uses no
nats-py internals itself. The client calls only :meth:`FastParser.parse` and,
on reconnects, :meth:`FastParser.reset`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.errors import ProtocolError

from .receiver import Receiver
from .routes import SUBJECT_CACHE, Hooks, Route, copy_out

__all__ = ["FastParser", "Hooks", "Route"]  # the last two from .routes

logger = logging.getLogger("msight_core.pubsub.nats")

_MSG = re.compile(
    rb"MSG[ \t]+([^ \t\r\n]{1,4096})[ \t]+(\d{1,19})[ \t]+(?:([^ \t\r\n]{1,4096})[ \t]+)?"
    rb"(\d{1,12})\r\n"
)
_HMSG = re.compile(
    rb"HMSG[ \t]+([^ \t\r\n]{1,4096})[ \t]+(\d{1,19})[ \t]+(?:([^ \t\r\n]{1,4096})[ \t]+)?"
    rb"(\d{1,12})[ \t]+(\d{1,12})\r\n"
)
# The control lines, anchored at the start of the buffer (as nats-py matches them).
_OK = re.compile(rb"\+OK[ \t]*\r\n")
_ERR = re.compile(rb"-ERR[ \t]+('[^\r\n]*')?[ \t]*\r\n")
_PING = re.compile(rb"PING[ \t]*\r\n")
_PONG = re.compile(rb"PONG[ \t]*\r\n")
_INFO = re.compile(rb"INFO[ \t]+([^\r\n]+)\r\n")
_M, _H, _CR, _LF = ord("M"), ord("H"), ord("\r"), ord("\n")
_MAX_CONTROL_LINE = 4096  # the server's default max_control_line
_MAX_SIZE = 64 * 1024 * 1024 + 64 * 1024  # nats-server's largest max_payload, plus headers
_FIRST_BUFFER = 256 * 1024  # the receiver's buffer at first; it doubles while reads fill it
_BUFFER_STEP_MAX = 8 * 1024 * 1024  # ... up to this, or the size of the message being read
_DROP_LOG_INTERVAL = 5.0
_FRAME_MIN = 128 * 1024  # with a receiver, payloads from this size go to the frame buffer
_THROTTLED_PASS = 1024 * 1024  # with a throttle: ask it again after this many bytes parsed


TakeOver = Callable[["FastParser"], "Receiver | None"]


class FastParser:
    """The NATS protocol parser a client calls, with routed subscriptions.

    Attributes:
        max_size: the largest message (headers and payload) accepted from the
            server; a larger size on a ``MSG`` line is a protocol error.
        throttle: when set, awaited between two reads; a receiver that waits
            for room returns from it once there is room (the socket is paused
            meanwhile once the buffer is full).
        take_over: set by :mod:`.internals`: installs a :class:`Receiver` on
            the client's current connection, or returns ``None``.
        dropped: well-framed messages that could not be handled.
    """

    def __init__(self, hooks: Hooks) -> None:
        self.hooks = hooks
        self.routes: dict[int, Route] = {}
        self.max_size = _MAX_SIZE
        self.throttle: Callable[[], Awaitable[None]] | None = None
        self.take_over: TakeOver | None = None
        self.dropped = 0
        self._last_drop_log = 0.0
        self.reset()

    def reset(self) -> None:
        """Forget a partly read command (the client calls it on reconnects)."""
        old = getattr(self, "_receiver", None)
        if old is not None:
            old.detach()
        self.buf = bytearray()
        self.pos = 0  # parsed up to here
        self.end = 0  # bytes received up to here; len(buf) is the capacity
        self._head: tuple[bytes, int, bytes, int, int] | None = None  # MSG awaiting payload
        self._receiver: Receiver | None = None
        self._tried = False  # take_over asked on this connection
        # A large payload is read straight into one reused buffer (no copy out of
        # the ring buffer, no compaction): the head of the message being read,
        # the buffer, and how much of payload + CRLF it holds.
        self.frame_head: tuple[bytes, int, bytes, int, int] | None = None
        self.frame = bytearray()
        self.frame_fill = 0

    def route(
        self,
        sid: int,
        deliver: Callable[[str, bytes, bytes, bytes | None], None],
        marker: bytes | None = None,
        views: bool = False,
    ) -> Route:
        """Send the plain messages of subscription ``sid`` to ``deliver``.

        Messages with headers go there too, unless a header block has a status
        line or contains ``marker``; the block is passed on only if the route
        keeps it (:meth:`Route.kept`: trace context), else ``None``. With
        ``views``, a large payload is passed as a memoryview valid during the call.

        Call it right after subscribing, before any message of the subscription
        took the client's path: routing the next ones directly could overtake it.
        """
        route = Route(deliver, marker, views)
        self.routes[sid] = route
        return route

    # -- entry point ---------------------------------------------------------------------

    async def parse(self, data: bytes = b"") -> None:
        """nats-py's read loop calls this with each read.

        With a :class:`Receiver` installed, the first call does not return
        until the connection ends (nats-py then finds end of file, or the
        error, on its own reader and reconnects).
        """
        try:
            if data:
                self._append(data)
            if not self._tried and self.take_over is not None:
                self._tried = True
                receiver = self.take_over(self)
                if receiver is not None:
                    self._receiver = receiver
                    await self._pump(receiver)
                    return
            buf = self.buf
            while True:
                await self._run()
                if self.buf is not buf:
                    return  # reset by a reconnect while awaiting a handler
                self._compact()
                if self.throttle is None:
                    return
                await self.throttle()
                if self.buf is not buf or not (self.pos < self.end and self._complete()):
                    return
        except (ProtocolError, asyncio.CancelledError):
            raise
        except Exception as exc:
            # nats-py's read loop stops for good on anything but a ProtocolError
            # (or an OSError): make it drop the connection and reconnect instead.
            logger.warning(
                "NATS protocol stream not understood (%s); reconnecting", type(exc).__name__
            )
            raise ProtocolError from exc

    def adopt(self, transport: Any, old: Any, buffered: bytes) -> Receiver:
        """Read ``transport`` from now on (called by :mod:`.internals`): ``old`` is
        its current protocol, ``buffered`` what that protocol had read and not
        handed over yet. Returns the receiver to install on the transport."""
        if buffered:
            self._append(buffered)
        receiver = Receiver(self, transport, old)
        if self.end >= len(self.buf):
            self._make_room()
        return receiver

    def _append(self, data: bytes) -> None:
        """The slow path (nats-py's reads): ``data`` goes after what is buffered."""
        buf = self.buf
        if self.end == len(buf):
            buf += data
        else:  # a receiver's buffer with room left (data that was read before it)
            buf[self.end : self.end] = data
        self.end += len(data)

    async def _pump(self, receiver: Receiver) -> None:
        """Parse what the receiver reads until the connection ends."""
        while True:
            await self._run()
            if self._receiver is not receiver:
                return  # reset by a reconnect while awaiting a handler
            self._make_room()
            throttle = self.throttle
            if throttle is not None:
                await throttle()
                if self._receiver is not receiver:
                    return
            if receiver.paused and (len(self.buf) > self.end or self.frame_head is not None):
                receiver.resume()
            if self.pos < self.end and self._complete():
                continue  # whole commands are waiting (a throttle returned)
            if receiver.closed:
                return
            await receiver.wait()

    def _complete(self) -> bool:
        """A whole command is buffered after ``pos``."""
        frame_head = self.frame_head
        if frame_head is not None:
            return self.frame_fill >= frame_head[4] + 2
        head = self._head
        if head is not None:
            return self.end - self.pos >= head[4] + 2
        return self.buf.find(b"\r\n", self.pos, self.end) >= 0

    def _compact(self) -> None:
        """The slow path: drop what was parsed (one memmove per message at most:
        a partly received payload starts at 0 until it is complete)."""
        if self.pos:
            del self.buf[: self.pos]
            self.end -= self.pos
            self.pos = 0

    def _make_room(self) -> None:
        """Move the unparsed bytes to the front and grow the buffer for the
        message being read (bounded by ``max_size``)."""
        buf = self.buf
        pos, end = self.pos, self.end
        head = self._head
        need = (head[4] + 2) if head is not None else _MAX_CONTROL_LINE + 2
        if pos and (pos == end or pos + need > len(buf) or end == len(buf)):
            left = end - pos
            if left:
                with memoryview(buf) as view:
                    view[:left] = view[pos:end]
            self.pos, self.end = 0, left
            pos, end = 0, left
        capacity = len(buf)
        if end < capacity and pos + need <= capacity:
            return
        # Grow for the message being read; while reads fill it, double it.
        target = max(pos + need, end + 1)
        if end >= capacity:
            target = max(target, min(capacity * 2, _BUFFER_STEP_MAX), _FIRST_BUFFER)
        target = min(target, pos + self.max_size + _MAX_CONTROL_LINE + 2)
        if target > capacity:
            buf.extend(bytes(target - capacity))

    def _drop(self, what: str, exc: BaseException | None) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_drop_log >= _DROP_LOG_INTERVAL:
            self._last_drop_log = now
            logger.warning(
                "NATS message dropped: %s%s (%d dropped so far)",
                what,
                f" ({type(exc).__name__})" if exc is not None else "",
                self.dropped,
            )

    # -- the protocol ---------------------------------------------------------------------

    async def _run(self) -> None:
        """Handle every whole command in ``buf[pos:end]``."""
        buf = self.buf
        pos = self.pos
        end = self.end
        hooks = self.hooks
        routes = self.routes
        stats = hooks.stats
        # With a throttle, stop after a while so that it is asked again in time.
        until = pos + _THROTTLED_PASS if self.throttle is not None else -1
        try:
            if self.frame_head is not None:
                if not await self._frame_done():
                    return
                if self.buf is not buf:
                    return
                pos, end = self.pos, self.end
            while pos < end:
                if pos > until > 0:
                    return
                head = self._head
                if head is not None:
                    subject, sid, reply, hdr_size, size = head
                    stop = pos + size
                    if stop + 2 > end:
                        return  # the payload is not all here yet
                    if buf[stop] != _CR or buf[stop + 1] != _LF:
                        raise ProtocolError("nats: no CRLF after a message payload")
                    self._head = None
                    route = routes.get(sid)
                    if (
                        route is not None
                        and not route.busy
                        and (not hdr_size or route.plain_headers(buf, pos, pos + hdr_size))
                    ):
                        kept = route.kept(buf, pos, pos + hdr_size) if hdr_size else None
                        payload = copy_out(buf, pos + hdr_size, stop)
                        pos = stop + 2
                        stats["in_msgs"] += 1
                        stats["in_bytes"] += size
                        name = route.subjects.get(subject)
                        try:
                            if name is None:
                                if len(route.subjects) >= SUBJECT_CACHE:
                                    route.subjects.clear()
                                name = route.subjects[subject] = subject.decode()
                            route.deliver(name, payload, reply, kept)
                        except Exception as exc:  # noqa: BLE001 - this message only
                            self._drop("cannot deliver it", exc)
                        continue
                    hdr = bytes(buf[pos : pos + hdr_size]) if hdr_size else None
                    payload = copy_out(buf, pos + hdr_size, stop)
                    pos = self.pos = stop + 2
                    if route is not None:
                        route.busy += 1
                    try:
                        await hooks.process_msg(sid, subject, reply, payload, hdr)
                    except Exception as exc:  # noqa: BLE001 - this message only
                        # Headers or names nats-py cannot take (a peer can publish
                        # them): the callback will not see it.
                        if route is not None:
                            route.done()
                        self._drop("nats-py could not take it", exc)
                    if self.buf is not buf:
                        return  # reset by a reconnect while awaiting
                    pos, end = self.pos, self.end  # the receiver may have moved them
                    continue
                first = buf[pos]
                if first == _M or first == _H:
                    match = (_MSG if first == _M else _HMSG).match(buf, pos, end)
                    if match is not None:
                        if first == _M:
                            subject, sid_text, reply, size_text = match.groups()
                            hdr_size = 0
                        else:
                            subject, sid_text, reply, hdr_text, size_text = match.groups()
                            hdr_size = int(hdr_text)
                        size = int(size_text)
                        if size > self.max_size or hdr_size > size:
                            raise ProtocolError("nats: message size out of bounds")
                        head = (subject, int(sid_text), reply or b"", hdr_size, size)
                        pos = match.end()
                        if size < _FRAME_MIN or self._receiver is None:
                            self._head = head
                            continue
                        # A large payload: what is here goes to the frame buffer, the
                        # rest is read straight into it.
                        need = size + 2
                        frame = self.frame
                        if len(frame) < need:
                            frame.extend(bytes(need - len(frame)))
                        have = min(end - pos, need)
                        if have:
                            with memoryview(frame) as dst, memoryview(buf) as src:
                                dst[:have] = src[pos : pos + have]
                        pos = self.pos = pos + have
                        self.frame_head, self.frame_fill = head, have
                        if not await self._frame_done():
                            return
                        if self.buf is not buf:
                            return
                        pos, end = self.pos, self.end
                        continue
                # Control lines (PING, PONG, INFO, +OK, -ERR) are rare.
                self.pos = pos
                consumed = await self._control(buf, pos, end)
                if self.buf is not buf:
                    return
                if not consumed:
                    return
                pos, end = self.pos + consumed, self.end
        finally:
            if self.buf is buf:
                self.pos = pos

    async def _frame_done(self) -> bool:
        """Hand over the message in the frame buffer if it is all there."""
        head = self.frame_head
        assert head is not None
        subject, sid, reply, hdr_size, size = head
        frame = self.frame
        if self.frame_fill < size + 2:
            return False
        if frame[size] != _CR or frame[size + 1] != _LF:
            raise ProtocolError("nats: no CRLF after a message payload")
        self.frame_head = None
        self.frame_fill = 0
        route = self.routes.get(sid)
        if (
            route is not None
            and not route.busy
            and (not hdr_size or route.plain_headers(frame, 0, hdr_size))
        ):
            stats = self.hooks.stats
            stats["in_msgs"] += 1
            stats["in_bytes"] += size
            try:
                kept = route.kept(frame, 0, hdr_size) if hdr_size else None
                with memoryview(frame) as view, view[hdr_size:size] as part:
                    data = part if route.views else part.tobytes()
                    route.deliver(subject.decode(), data, reply, kept)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - this message only
                self._drop("cannot deliver it", exc)
            return True
        with memoryview(frame) as view:
            payload = view[hdr_size:size].tobytes()
        hdr = bytes(frame[:hdr_size]) if hdr_size else None
        if route is not None:
            route.busy += 1
        try:
            await self.hooks.process_msg(sid, subject, reply, payload, hdr)
        except Exception as exc:  # noqa: BLE001 - this message only
            if route is not None:
                route.done()
            self._drop("nats-py could not take it", exc)
        return True

    async def _control(self, buf: bytearray, pos: int, end: int) -> int:
        """Handle one whole line at ``pos``: its length, 0 if it is not all here.

        Raises:
            ProtocolError: the line is too long, unknown, or malformed.
        """
        line_end = buf.find(b"\r\n", pos, min(end, pos + _MAX_CONTROL_LINE + 2))
        if line_end < 0:
            if end - pos > _MAX_CONTROL_LINE:
                raise ProtocolError("nats: control line too long")
            return 0
        stop = line_end + 2
        hooks = self.hooks
        match = _OK.match(buf, pos, stop)
        if match:
            return stop - pos
        match = _PING.match(buf, pos, stop)
        if match:
            await hooks.process_ping()
            return stop - pos
        match = _PONG.match(buf, pos, stop)
        if match:
            await hooks.process_pong()
            return stop - pos
        match = _ERR.match(buf, pos, stop)
        if match:
            text = (match.group(1) or b"").decode("utf-8", "replace").lower()
            await hooks.process_err(text)
            return stop - pos
        match = _INFO.match(buf, pos, stop)
        if match:
            try:
                info = json.loads(match.group(1))
            except ValueError:  # JSONDecodeError, UnicodeDecodeError
                raise ProtocolError("nats: INFO is not JSON") from None
            if not isinstance(info, dict):
                raise ProtocolError("nats: INFO is not a JSON object")
            await hooks.process_info(info)
            return stop - pos
        raise ProtocolError("nats: unknown protocol")
