"""The NATS backend on the caller's event loop, for ``msight_core.aio`` (not public API).

:class:`LoopClient` drives the same roles as the synchronous backend (built by
:func:`.parts.assemble`: connection options, the fast parser and its checks of
what the server sends, large frames, core or JetStream mode, acknowledgements)
with nats-py running on the *running* loop: no thread of its own. What waits
for the broker is awaited (connect, stream creation, subscribe, flush, close);
``publish_nowait()`` appends to the publisher's buffer like the synchronous
``publish()``, and the writer coroutine sends it on the same loop.

The facade :mod:`msight_core.pubsub.nats` exposes it as ``NATSLoopClient``; the
asyncio backend :class:`msight_core.aio.AsyncNATSPubSub` is its only user. One
instance serves the loop of its first call.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from ...config import NatsConfig
from ...errors import BackpressureError, ClosedError, MsightError
from ...tracing import outgoing
from .._core import Delivery
from ..base import Capabilities
from . import internals
from .commands import header_lines
from .conn import run_here
from .frames import LINGER_SECONDS
from .parts import assemble, counters, trace_lines

__all__ = ["LoopClient"]

logger = logging.getLogger("msight_core.pubsub.nats")


class LoopClient:
    """nats-py and the NATS backend's roles on the caller's running loop.

    Args:
        config: the backend's settings (``get_nats_config()``).
        deliver: the receive queue's ``put_many`` (called on the loop; never waits,
            except with ``MSIGHT_QUEUE_OVERFLOW=block``, where ``offer`` is used).
        offer: the receive queue's ``offer`` (queue what fits, never drop).
        fail: the receive queue's ``fail`` (the connection closed for good).

    Raises:
        ConfigError: TLS files cannot be loaded, or auth settings conflict.
    """

    def __init__(
        self,
        config: NatsConfig,
        deliver: Callable[[list[Delivery]], Any],
        offer: Callable[[deque[Delivery]], None],
        fail: Callable[[BaseException], None],
    ) -> None:
        self.config = config
        self._parts = assemble(config, deliver, fail, offer)
        self.capabilities: Capabilities = self._parts.mode.capabilities
        self._conn, self._mode = self._parts.conn, self._parts.mode  # the hot path's
        self._publisher = self._parts.publisher
        self.where = self._parts.conn.where

    def __repr__(self) -> str:
        mode = " jetstream" if self.config.jetstream else ""
        return f"<NATSLoopClient {self.where}{mode} {self._parts.conn.describe()}>"

    @property
    def connection_state(self) -> str:
        return self._parts.conn.describe()

    async def connect(self) -> None:
        """Connect unless connected (on this loop).

        Raises:
            BrokerUnavailableError: no server could be reached.
            AuthenticationError: the server refused the credentials.
        """
        parts = self._parts
        if parts.conn.client is None:
            try:
                await parts.conn.open_here(parts.listeners)
            except ClosedError:  # close() came first: the writer's tasks go too
                parts.publisher.begin_close()
                parts.publisher.stop()
                raise

    async def subscribe(self, name: str, pattern: bool = False) -> None:
        """Subscribe a checked name (or core-NATS pattern); returns once the server has it."""
        await self.connect()
        parts = self._parts
        if not pattern:
            await parts.mode.aprepare(name)
        await run_here(
            parts.subscriber.subscribe(name), parts.mode.subscribe_timeout, f"subscribe to {name!r}"
        )

    def publish_nowait(self, name: str, data: bytes) -> bool:
        """Queue ``data`` for ``name`` if that needs no waiting: connected, the topic
        ready, a payload below ``max_payload``, room in the buffer. ``False``:
        nothing queued, use :meth:`publish`.

        Raises:
            PublishError: an earlier JetStream message was refused.
        """
        conn = self._conn
        mode = self._mode
        if conn.client is None or not mode.ready(name):
            return False
        max_payload = conn.max_payload
        if len(data) > max_payload - mode.headroom:
            return False
        trace = outgoing()  # None unless tracing is on and a span is active
        lines = header_lines(trace) if trace else b""
        return self._publisher.publish(name, data, max_payload, lines, False)

    async def publish(self, name: str, data: bytes) -> None:
        """Queue ``data`` for ``name``, awaiting what :meth:`publish_nowait` would not.

        Raises:
            BrokerUnavailableError, AuthenticationError: the first connect failed.
            PayloadTooLargeError: above ``max_payload`` and no JetStream to carry it.
            BackpressureError: the buffer stayed full for the publish timeout.
            PublishError: an earlier JetStream message was refused.
        """
        lines = trace_lines()  # the caller's span, before anything is awaited
        await self.connect()
        parts = self._parts
        conn = parts.conn
        mode = parts.mode
        await mode.aprepare(name)
        max_payload = conn.max_payload
        large = parts.large
        if len(data) > max_payload - mode.headroom:
            large.check(len(data), max_payload, conn.jetstream_available)
            if not large.ready and not large.core:  # core mode: chunks over core NATS
                what = "create the large-frame stream"
                await run_here(large.ensure_stream(conn.client), large.timeout, what)
        timeout = self.config.publish.timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        publisher = parts.publisher
        while not publisher.publish(name, data, max_payload, lines, wait=False):
            await publisher.settle(len(data), max(deadline - loop.time(), 0.0))

    async def flush(self, timeout: float | None) -> None:
        """Until everything accepted reached the server (JetStream: is acknowledged).

        Raises:
            BackpressureError: not so within ``timeout`` (``None``: the publish timeout).
            PublishError: an accepted message was refused.
        """
        conn = self._parts.conn
        if conn.client is None:
            return
        budget = self.config.publish.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        await self._parts.publisher.settle(None, budget)
        remaining = max(deadline - loop.time(), 0.05)
        try:
            await run_here(internals.confirm(conn.client, remaining), remaining + 0.5, "flush")
        except MsightError as exc:
            raise BackpressureError(f"flush: {exc}") from None
        self._parts.publisher.raise_error()  # a refusal comes before the PONG

    def ack(self, token: Any) -> None:
        self._parts.mode.ack(token)

    def ack_flush(self) -> None:
        self._parts.mode.ack_flush()

    async def close(self) -> None:
        """Stop deliveries (JetStream: return what was not processed), send what was
        accepted (bounded by the publish timeout), close the connection. The
        receive queue must be closed before."""
        parts = self._parts
        parts.subscriber.close()
        conn = parts.conn
        if conn.client is None:
            conn.begin_close()  # a connect still in flight closes what it made
            return
        subscriber = parts.subscriber
        await parts.mode.astop(subscriber.drain if subscriber.topics() else None)
        publisher = parts.publisher
        try:
            await publisher.settle(None, self.config.publish.timeout)
        except MsightError as exc:
            buffered, unacked = publisher.pending()
            logger.warning(
                "closing NATS with %d message(s) unsent and %d unacknowledged: %s",
                buffered,
                unacked,
                exc,
            )
        await parts.large.linger(LINGER_SECONDS)
        conn.begin_close()
        publisher.begin_close()
        try:
            await conn.close_here(self.config.publish.timeout)
        finally:
            publisher.stop()

    def stats(self) -> dict[str, Any]:
        return counters(self._parts)
