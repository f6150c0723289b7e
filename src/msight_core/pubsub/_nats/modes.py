"""Core NATS and JetStream mode of the NATS backend (not public API).

A backend holds one mode, chosen from ``NatsConfig.jetstream`` when it is made:
the strategy for everything that differs between the two.

* :class:`CoreMode`: plain subscriptions (the NATS queue group ``group_id``
  when set), nothing stored, nothing to acknowledge.
* :class:`JetStreamMode`: each topic is stored in a stream (an existing one
  covering the subject, or ``MSIGHT_<topic>_<hash>``). With ``group_id`` the
  subscription binds to the durable consumer named after it, shared by all
  members (each message to one member) and resumed after restarts; without
  it, each subscriber gets its own consumer starting at new messages. A
  delivery is acknowledged when the application asks for the next one (acks
  are sent in batches); on close, what was delivered but not processed is
  returned to the group at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from ...config import NatsConfig
from ...errors import ClosedError, MsightError
from ..base import Capabilities
from . import internals
from .conn import run_here
from .streams import consumer_config, durable_name, ensure_topic_stream

__all__ = ["CoreMode", "JetStreamMode"]

logger = logging.getLogger("msight_core.pubsub.nats")

_SUB_PENDING_MSGS = 1_000_000
_SUB_PENDING_BYTES = 512 * 1024 * 1024
_ACK_BATCH = 64  # JetStream acks held back at most before they are sent
# How long close() waits for the server's group consumers to see our member go.
_UNBIND_WAIT = 0.25

Run = Callable[[Coroutine[Any, Any, Any], float | None, str], Any]
Drain = Callable[[], Coroutine[Any, Any, None]]


class CoreMode:
    """Core NATS: broadcast or queue groups, best-effort, nothing to acknowledge."""

    # Wildcards are NATS's own subject syntax: a pattern is subscribed as it is.
    capabilities = Capabilities(
        broadcast=True, groups=True, persistent=False, ordered=True, patterns=True
    )
    acknowledges = False
    headroom = 0
    """Bytes of ``max_payload`` an ordinary publish leaves for headers."""

    def __init__(self, group_id: str | None, connect_timeout: float) -> None:
        self._group = group_id or ""
        self.chunks = not group_id
        """Broadcast: also subscribe the chunks of large frames (:mod:`.chunks`)."""
        self.subscribe_timeout = connect_timeout * 3

    def prepare(self, name: str) -> None:
        """Before publishing to or subscribing ``name``: nothing to set up."""

    def ready(self, name: str) -> bool:
        """Whether ``name`` needs no :meth:`aprepare` (always, in core NATS)."""
        return True

    async def aprepare(self, name: str) -> None:
        """:meth:`prepare` on the running loop (the asyncio backend)."""

    async def subscribe(
        self, nc: Any, name: str, cb: Callable[[Any], Awaitable[None]]
    ) -> tuple[Any, tuple[int, int] | None]:
        sub = await nc.subscribe(
            name,
            queue=self._group,
            cb=cb,
            pending_msgs_limit=_SUB_PENDING_MSGS,
            pending_bytes_limit=_SUB_PENDING_BYTES,
        )
        return sub, internals.core_route(sub)

    def token(self, reply: str) -> Any:
        return None

    def lost_frame(self, reply: str) -> None:
        pass

    def ack(self, token: Any) -> None:
        pass

    def ack_flush(self) -> None:
        pass

    def stop(self, drain: Drain | None) -> None:
        pass

    async def astop(self, drain: Drain | None) -> None:
        pass


class JetStreamMode:
    """JetStream: durable, at-least-once, replay for returning groups.

    Args:
        config: the backend's configuration.
        run: runs a coroutine on the backend's loop and waits for it (``None``
            for the asyncio backend, which awaits: ``aprepare``, ``astop``).
        client: returns the connected nats-py client.
        send: queues a protocol command behind the publisher's (acks, NAKs).
    """

    capabilities = Capabilities(broadcast=True, groups=True, persistent=True, ordered=True)
    acknowledges = True
    headroom = 256  # the Nats-Msg-Id header of a tracked publish
    chunks = False  # large frames are stored, not sent in chunks

    def __init__(
        self,
        config: NatsConfig,
        run: Run | None,
        client: Callable[[], Any],
        send: Callable[[bytes], None],
    ) -> None:
        self._config = config
        self._run = run
        self._client = client
        self._send = send
        self.subscribe_timeout = config.publish.timeout
        self._streams: dict[str, str] = {}
        # Delivered to us but not yet acknowledged (queued or in the application's
        # hands): negatively acknowledged on close so the group gets them at once.
        self._outstanding: dict[str, None] = {}
        self._acks: list[bytes] = []  # processed, acknowledgement not yet handed over
        self._bound: set[str] = set()  # topics subscribed through the group's consumer

    def prepare(self, name: str) -> None:
        """Before publishing to or subscribing ``name``: its stream exists (blocks)."""
        if name not in self._streams:
            assert self._run is not None, "the asyncio backend uses aprepare()"
            self._streams[name] = self._run(*self._ensure(name))

    def ready(self, name: str) -> bool:
        """Whether the stream of ``name`` is known to exist."""
        return name in self._streams

    async def aprepare(self, name: str) -> None:
        """:meth:`prepare` on the running loop (the asyncio backend)."""
        if name not in self._streams:
            self._streams[name] = await run_here(*self._ensure(name))

    def _ensure(self, name: str) -> tuple[Coroutine[Any, Any, str], float, str]:
        cfg = self._config
        coro = ensure_topic_stream(
            self._client(),
            name,
            cfg.stream_max_age,
            cfg.stream_max_bytes,
            cfg.publish.timeout,
            cfg.stream_replicas,
        )
        return coro, cfg.publish.timeout, f"create the stream for {name!r}"

    async def subscribe(
        self, nc: Any, name: str, cb: Callable[[Any], Awaitable[None]]
    ) -> tuple[Any, tuple[int, int] | None]:
        cfg = self._config
        group = cfg.group_id
        consumer = consumer_config(bool(group), cfg.ack_wait, min(1000, cfg.queue.max_messages))
        binding: dict[str, Any] = {}
        if group:
            durable = durable_name(group)
            binding = {"queue": durable, "durable": durable}
            self._bound.add(name)
        sub = await nc.jetstream(timeout=cfg.publish.timeout).subscribe(
            name,
            stream=self._streams[name],
            cb=cb,
            manual_ack=True,
            config=consumer,
            pending_msgs_limit=_SUB_PENDING_MSGS,
            pending_bytes_limit=_SUB_PENDING_BYTES,
            **binding,
        )
        return sub, internals.jetstream_route(sub)

    def token(self, reply: str) -> Any:
        if not reply:
            return None
        self._outstanding[reply] = None
        return reply

    def lost_frame(self, reply: str) -> None:
        # Terminated, not just acknowledged: the stream never redelivers a notice
        # whose frame is gone or that was not a valid notice.
        if reply:
            self._outstanding.pop(reply, None)
            self._send(b"PUB %s 5\r\n+TERM\r\n" % reply.encode())

    def ack(self, token: Any) -> None:
        # Held back and sent in one piece when the application has gone through
        # what it took from the queue (or _ACK_BATCH of them): one hand-over to
        # the loop per batch instead of a loop wake-up per message.
        self._outstanding.pop(token, None)
        self._acks.append(b"PUB %s 0\r\n\r\n" % token.encode())
        if len(self._acks) >= _ACK_BATCH:
            self.ack_flush()

    def ack_flush(self) -> None:
        if not self._acks:
            return
        acks, self._acks = self._acks, []
        try:
            self._send(b"".join(acks))
        except ClosedError:
            logger.debug("%d ack(s) after close dropped; redelivered later", len(acks))

    def stop(self, drain: Drain | None) -> None:
        """Before the connection closes: send the acks, stop deliveries, return
        what was delivered but not processed (blocks, bounded)."""
        self.ack_flush()
        nc = self._client()
        if nc is not None and drain is not None and nc.is_connected:
            # Stop deliveries before leaving: the server removes our interest (so it
            # stops pushing to an inbox about to vanish, where messages would wait
            # ack_wait for redelivery) and what it had already sent reaches the
            # callback, to be returned to the group below.
            assert self._run is not None, "the asyncio backend uses astop()"
            try:
                self._run(self._leave(nc, drain), self._config.publish.timeout, "stop deliveries")
            except MsightError:
                logger.debug("stopping JetStream deliveries failed", exc_info=True)
        self._return_unprocessed(nc)

    async def astop(self, drain: Drain | None) -> None:
        """:meth:`stop` on the running loop (the asyncio backend)."""
        self.ack_flush()
        nc = self._client()
        if nc is not None and drain is not None and nc.is_connected:
            try:
                await run_here(
                    self._leave(nc, drain), self._config.publish.timeout, "stop deliveries"
                )
            except MsightError:
                logger.debug("stopping JetStream deliveries failed", exc_info=True)
        self._return_unprocessed(nc)

    async def _leave(self, nc: Any, drain: Drain) -> None:
        """Unsubscribe, then wait (bounded) until each group consumer no longer
        counts us as bound: the server learns of a lost interest asynchronously,
        and until it does it pushes new messages to our vanished inbox, where
        they would wait out ``ack_wait`` instead of going to the next member
        (seen 1 hand-over in 300). While other members stay, the consumer stays
        bound and this waits the whole bound."""
        await drain()
        group, bound, self._bound = self._config.group_id, self._bound, set()
        if not group or not bound:
            return
        jsm = nc.jsm(timeout=_UNBIND_WAIT)
        deadline = asyncio.get_running_loop().time() + _UNBIND_WAIT
        waiting = {self._streams[name] for name in bound if name in self._streams}
        while waiting and asyncio.get_running_loop().time() < deadline:
            for stream in list(waiting):
                try:
                    info = await jsm.consumer_info(stream, durable_name(group))
                except Exception:  # gone, or no answer in time: nothing to wait for
                    logger.debug("consumer info for %s on close", stream, exc_info=True)
                    info = None
                if info is None or not info.push_bound:
                    waiting.discard(stream)
            if waiting:
                await asyncio.sleep(0.01)

    def _return_unprocessed(self, nc: Any) -> None:
        if nc is not None and self._outstanding:
            tokens = list(self._outstanding)
            self._outstanding.clear()
            for reply in tokens:
                self._send(b"PUB %s 4\r\n-NAK\r\n" % reply.encode())
            logger.debug("returned %d unprocessed message(s) to JetStream", len(tokens))
