"""The NATS backend's receiving side, :class:`Subscriber` (not public API).

Received plain messages go from the protocol parser (:mod:`.parser`, installed
on the client before it connects) straight into the backend's receive queue, a
batch per loop iteration; JetStream deliveries take the same route with their
ack subject. Messages whose headers matter (large-frame notices, JetStream
status messages) take nats-py's subscription callback, where a notice is
resolved into its frame (:class:`.frames.LargeFrames`). Without the parser
(nats-py's internals differ, or the public path is forced) every message takes
the callback.

What differs between core NATS and JetStream mode (how a topic is subscribed,
what acknowledges a delivery) is the mode's (:mod:`.modes`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from .._core import Delivery
from . import internals
from .frames import FRAME_HEADER, FRAME_MARKER, LargeFrames
from .parser import FastParser

__all__ = ["SubscribeMode", "Subscriber"]


class SubscribeMode(Protocol):
    """What the subscriber needs from the mode (core NATS or JetStream)."""

    acknowledges: bool

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


class Subscriber:
    """Subscriptions of one backend and the feed of its receive queue.

    Args:
        mode: how topics are subscribed and deliveries acknowledged.
        large: reads large frames back.
        deliver: puts deliveries, in order, into the receive queue.
        timeout: seconds to wait for the server to confirm a subscription.
    """

    def __init__(
        self,
        mode: SubscribeMode,
        large: LargeFrames,
        deliver: Callable[[list[Delivery]], Any],
        timeout: float,
    ) -> None:
        self._mode = mode
        self._large = large
        self._put_many = deliver
        self._timeout = timeout
        self._nc: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._parser: FastParser | None = None
        self._subs: dict[str, Any] = {}
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
        self._parser = internals.install_parser(nc, FastParser)

    async def subscribe(self, name: str) -> None:
        """Subscribe ``name``; returns once the server has the subscription."""
        nc = self._nc
        sub, key = await self._mode.subscribe(nc, name, self._on_message)
        self._subs[name] = sub
        parser = self._parser
        if parser is not None and key is not None:
            sid, delivered = key
            # Plain messages skip nats-py's Msg object, queue and task (parser.py),
            # unless one already took that path: routing the next ones could overtake it.
            if not delivered:
                parser.route(sid, self._direct, FRAME_MARKER)
        await nc.flush(self._timeout)  # the server has the SUB now

    async def drain(self) -> None:
        """Stop deliveries: UNSUB, a round trip, and the callback sees what came before."""
        subs = list(self._subs.values())
        self._subs.clear()
        for sub in subs:
            await sub.drain()

    def route_done(self, sid: int) -> None:
        """A message of subscription ``sid`` that took nats-py's path is handled
        (or was dropped): the parser may route the next ones directly again."""
        route = self._parser.routes.get(sid) if self._parser is not None else None
        if route is not None:
            route.done()

    def _deliver(self, subject: str, data: bytes, reply: bytes) -> None:
        """A routed plain message, straight from the parser."""
        self._collect(Delivery(subject, data, None))

    def _deliver_acked(self, subject: str, data: bytes, reply: bytes) -> None:
        """A routed delivery to acknowledge; ``reply`` is its ack subject."""
        self._collect(Delivery(subject, data, self._mode.token(reply.decode())))

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

    async def _handle(self, msg: Any) -> None:
        headers = msg.headers
        mode = self._mode
        if headers and FRAME_HEADER in headers:
            self._flush_inbox()  # keep order: what came before the frame goes first
            data = await self._large.fetch(self._nc, msg.subject, headers)
            if data is None:
                mode.lost_frame(msg.reply)
                return
            self._put_many([Delivery(msg.subject, data, mode.token(msg.reply))])
            return
        self._collect(Delivery(msg.subject, msg.data, mode.token(msg.reply)))
