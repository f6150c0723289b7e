"""NATS backend: a synchronous facade over nats-py, for real-time sensor streams.

Each :class:`NATSPubSub` runs one asyncio event loop on a daemon thread. From
any thread, ``publish()`` formats the NATS command and appends it to a buffer
that a writer coroutine hands to nats-py in batches (see ``_nats_pub``), so
there is no loop hand-off or round trip per message. Received plain messages go
from the protocol parser (``_nats_parser``, which replaces nats-py's and skips its
per-message objects and tasks) straight into the bounded receive queue read by
``listen()``/``receive()``, a batch per socket read; JetStream deliveries take the
same route with their ack subject. Messages whose headers matter (large-frame
notices, JetStream status messages) take nats-py's subscription callback.

* **Groups.** With ``group_id``, subscriptions join the NATS queue group of that
  name: each message goes to one member. Without it, every subscriber gets all.
* **Payloads** go on the wire unchanged: a plain NATS subscriber reads exactly
  the published bytes. A payload above the server's ``max_payload`` (1 MB by
  default) is stored as chunks in a JetStream stream and announced by a small
  header-only message on the topic, which the receiving msight subscriber
  resolves (``_nats_streams.LargeFrames``). Without JetStream, such a payload
  raises :class:`PayloadTooLargeError` before anything is sent.
* **Reconnects** are nats-py's (subscriptions and queue groups are restored);
  while disconnected, publishes wait in our buffer (``PublishConfig``).
* **JetStream mode** (``MSIGHT_NATS_JETSTREAM=true``) builds a
  :class:`NATSJetStreamPubSub`: each topic is stored in a stream, publishes are
  acknowledged by the server (and resent, de-duplicated, when the ack is late),
  and a group's durable consumer, named after ``group_id``, resumes where the
  group left off. A message is acknowledged when the application asks for the
  next one (or closes the backend).

Speed comes from reaching past nats-py's public API in three places, each
checked and with a fallback: the parser (``Client._ps``, installed only if the
client's hooks have the expected signatures), the send buffer
(``_send_command``/``_flush_pending``), and the socket transport for payloads
from 128 KB (TCP connections only; otherwise nats-py's buffer). The tests run
with the installed nats-py, and also without the parser.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from typing import Any

from ..config import NatsConfig, load_nats_config
from ..errors import (
    AuthenticationError,
    BrokerUnavailableError,
    ClosedError,
    MsightError,
    PayloadTooLargeError,
)
from ._core import Delivery, QueueBackend
from ._nats_conn import LoopThread, client_options, nats, safe_servers, translate
from ._nats_parser import install as install_parser
from ._nats_pub import FRAME_HEADER, Publisher
from ._nats_streams import LargeFrames, durable_name, ensure_topic_stream
from .base import Capabilities

__all__ = ["NATSJetStreamPubSub", "NATSPubSub"]

logger = logging.getLogger(__name__)

_SUB_PENDING_MSGS = 1_000_000
_SUB_PENDING_BYTES = 512 * 1024 * 1024
_FRAME_MARKER = FRAME_HEADER.encode() + b":"  # large-frame notices need their headers
_ACK_BATCH = 64  # JetStream acks held back at most before they are sent
_live: weakref.WeakSet[NATSPubSub] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    # A script that publishes and exits must not lose what publish() accepted.
    for backend in list(_live):
        try:
            backend.close()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            logger.debug("close at exit failed", exc_info=True)


class NATSPubSub(QueueBackend):
    """NATS pub/sub: broadcast or queue groups, very low latency, best-effort.

    Args:
        config: a :class:`~msight_core.config.NatsConfig` (the seed's
            ``get_nats_config(group_id=...)``); ``None`` reads ``MSIGHT_NATS_*``.
            With ``config.jetstream`` the instance is a :class:`NATSJetStreamPubSub`.

    No connection is made until the first ``subscribe()`` or ``publish()``;
    that call raises :class:`BrokerUnavailableError` (or
    :class:`AuthenticationError`) if the server cannot be reached.
    """

    capabilities = Capabilities(broadcast=True, groups=True, persistent=False, ordered=True)

    def __new__(cls, config: NatsConfig | None = None) -> NATSPubSub:  # noqa: PYI034
        # JetStream mode is a subclass so that its class-level capabilities are true.
        chosen = cls
        if cls is NATSPubSub:
            jetstream = getattr(config, "jetstream", False)
            if config is None:
                jetstream = load_nats_config().jetstream
            if jetstream:
                chosen = NATSJetStreamPubSub
        return super().__new__(chosen)

    def __init__(self, config: NatsConfig | None = None) -> None:
        if config is None:
            config = load_nats_config()
        if not isinstance(config, NatsConfig):
            raise TypeError(
                f"NATSPubSub expects a NatsConfig (get_nats_config()), got {type(config).__name__}"
            )
        if isinstance(self, NATSJetStreamPubSub) and not config.jetstream:
            import dataclasses

            config = dataclasses.replace(config, jetstream=True)
        super().__init__(config.queue)
        self.config = config
        self.group_id = config.group_id
        self.servers_shown = safe_servers(config.servers)
        self._options = client_options(config)  # raises ConfigError early
        self._connect_lock = threading.Lock()
        self._loop: Any = None
        self._nc: Any = None
        self._js_available = False
        self._max_payload = 1024 * 1024
        self._publisher = Publisher(self)
        self._large = LargeFrames(
            config.large_frame_ttl, config.large_frame_store_bytes, config.publish.timeout
        )
        self._subs: dict[str, Any] = {}
        self._parser: Any = None  # _nats_parser.FastParser once connected (if supported)
        self._inbox: list[Delivery] = []
        self._inbox_scheduled = False
        self._streams: dict[str, str] = {}
        self._lost_at: float | None = None
        self._connect_error: BaseException | None = None
        self._closing = False
        self.reconnects = 0
        self.slow_consumer_drops = 0
        self.outage_seconds = 0.0

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("connected" if self._nc else "idle")
        mode = " jetstream" if self.config.jetstream else ""
        return (
            f"<{type(self).__name__} {self.servers_shown}{mode} group_id={self.group_id!r} "
            f"{state} topics={list(self.topics)}>"
        )

    @property
    def connection_state(self) -> str:
        nc = self._nc
        if nc is None:
            return "not connected"
        if nc.is_connected:
            return "connected"
        if self._lost_at is not None:
            return f"disconnected for {time.monotonic() - self._lost_at:.1f}s"
        return "disconnected"

    # -- connection ---------------------------------------------------------------

    def _ensure_connected(self) -> None:
        if self._nc is not None:
            return
        with self._connect_lock:
            if self._nc is not None:
                return
            self._check_open()
            loop = LoopThread()
            self._loop = loop
            budget = self.config.connect_timeout * (len(self.config.servers) + 1) + 2
            try:
                loop.run(self._connect(), budget, f"connect to {self.servers_shown}")
            except MsightError as exc:
                loop.stop()
                self._loop = None
                if isinstance(exc, AuthenticationError):
                    raise
                raise type(exc)(f"{exc} (servers: {self.servers_shown})") from None
            _live.add(self)

    async def _connect(self) -> None:
        try:
            nc = nats.aio.client.Client()
            self._parser = install_parser(nc)
            await nc.connect(
                **self._options,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                closed_cb=self._on_closed,
            )
        except Exception as exc:  # noqa: BLE001 - translated just below
            # nats-py reports "no servers" after trying them all; the reason (refused
            # credentials, say) went to the error callback.
            cause = self._connect_error if isinstance(exc, nats.errors.NoServersError) else exc
            raise translate(cause or exc, f"connect to {self.servers_shown}") from None
        nc.options["max_reconnect_attempts"] = -1  # from now on: reconnect forever
        self._update_info(nc)
        self._nc = nc
        self._publisher.start()

    def _update_info(self, nc: Any) -> None:
        self._max_payload = int(nc.max_payload)
        self._js_available = bool(getattr(nc, "_server_info", {}).get("jetstream"))

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            self.slow_consumer_drops += 1
            self._route_done(exc.sid)  # dropped: the callback will not see it
            if self.slow_consumer_drops == 1 or self.slow_consumer_drops % 1000 == 0:
                logger.warning(
                    "NATS slow consumer: dropped %d message(s) so far (last on %r)",
                    self.slow_consumer_drops,
                    exc.subject,
                )
            return
        if self._nc is None:  # still connecting: the caller gets the error
            previous = self._connect_error
            if previous is None or not isinstance(translate(previous, ""), AuthenticationError):
                self._connect_error = exc  # a refusal outranks the reset that follows it
            return
        if self._lost_at is not None or self._closing:
            logger.debug("NATS error while disconnected: %s", type(exc).__name__)
            return
        if isinstance(exc, nats.errors.AuthorizationError) or "authoriz" in str(exc).lower():
            logger.error("NATS at %s refused the credentials", self.servers_shown)
        else:
            logger.debug("NATS error: %s", type(exc).__name__)

    async def _on_disconnected(self) -> None:
        if self._closing or self._lost_at is not None:
            return
        self._lost_at = time.monotonic()
        self.reconnects += 1
        # Core NATS has no receipts: what was sent since the last PONG may be lost.
        at_risk = 0 if self.config.jetstream else self._publisher.lost_connection()
        logger.warning(
            "lost NATS at %s; reconnecting every %gs. Publishes wait in a buffer of up "
            "to %d bytes; %s",
            self.servers_shown,
            self.config.reconnect_wait,
            self.config.publish.buffer_bytes,
            "unacknowledged JetStream messages will be resent"
            if self.config.jetstream
            else f"{at_risk} message(s) sent just before may be lost, and messages "
            "published meanwhile by others are lost (NATS is best-effort)",
        )

    async def _on_reconnected(self) -> None:
        nc = self._nc
        if nc is not None:
            self._update_info(nc)
        self._large.reset()
        outage = 0.0
        if self._lost_at is not None:
            outage = time.monotonic() - self._lost_at
            self.outage_seconds += outage
            self._lost_at = None
        backlog = 0 if self.config.jetstream else self._publisher.backlog_at_reconnect()
        logger.warning(
            "reconnected to NATS at %s after %.2fs; subscriptions restored: %s%s",
            self.servers_shown,
            outage,
            ", ".join(self._subs) or "none",
            f"; sending {backlog} buffered message(s), which subscribers that are not back yet miss"
            if backlog
            else "",
        )
        self._publisher.requeue_unacked()
        self._publisher.wake()

    async def _on_closed(self) -> None:
        if not self._closing:
            exc = BrokerUnavailableError(f"the NATS connection to {self.servers_shown} closed")
            logger.error("%s; no more messages will arrive", exc)
            self._queue.fail(exc)

    # -- the backend hooks --------------------------------------------------------

    def _subscribe(self, name: str) -> None:
        self._ensure_connected()
        timeout = self.config.connect_timeout
        self._loop.run(self._subscribe_async(name), timeout * 3, f"subscribe to {name!r}")

    async def _subscribe_async(self, name: str) -> None:
        nc = self._nc
        sub = self._subs[name] = await nc.subscribe(
            name,
            queue=self.group_id or "",
            cb=self._on_message,
            pending_msgs_limit=_SUB_PENDING_MSGS,
            pending_bytes_limit=_SUB_PENDING_BYTES,
        )
        if self._parser is not None:
            # Plain messages skip nats-py's Msg object, queue and task (_nats_parser).
            self._parser.route(sub, self._deliver, _FRAME_MARKER)
        await nc.flush(self.config.connect_timeout)  # the server has the SUB now

    def _deliver(self, subject: str, data: bytes, reply: bytes) -> None:
        """On the loop: a routed plain message, straight from the parser."""
        self._collect(Delivery(subject, data, None))

    def _collect(self, delivery: Delivery) -> None:
        # Collect what arrives in this loop iteration and queue it in one go: one
        # lock and one wake-up of the application thread per batch.
        self._inbox.append(delivery)
        if not self._inbox_scheduled:
            self._inbox_scheduled = True
            self._loop.loop.call_soon(self._flush_inbox)

    async def _on_message(self, msg: Any) -> None:
        try:
            await self._handle(msg)
        finally:
            self._route_done(msg.sid)  # the parser may route it directly again

    def _route_done(self, sid: int) -> None:
        """A message of subscription ``sid`` that took nats-py's path is handled."""
        route = self._parser.routes.get(sid) if self._parser is not None else None
        if route is not None:
            route.done()

    async def _handle(self, msg: Any) -> None:
        headers = msg.headers
        if headers and FRAME_HEADER in headers:
            self._flush_inbox()  # keep order: what came before the frame goes first
            data = await self._large.fetch(self._nc, msg.subject, headers)
            if data is None:
                self._lost_frame(msg)
                return
            self._queue.put(Delivery(msg.subject, data, self._token(msg.reply)))
            return
        self._collect(Delivery(msg.subject, msg.data, self._token(msg.reply)))

    def _flush_inbox(self) -> None:
        self._inbox_scheduled = False
        if self._inbox:
            batch, self._inbox = self._inbox, []
            self._queue.put_many(batch)

    def _token(self, reply: str) -> Any:
        """What acknowledges a delivery with this reply subject (core NATS: nothing)."""
        return None

    def _lost_frame(self, msg: Any) -> None:
        """A frame whose chunks expired; JetStream mode acknowledges the notice."""

    def _publish(self, name: str, data: bytes) -> None:
        if self._nc is None:
            self._ensure_connected()
        max_payload = self._max_payload
        if len(data) > max_payload - (256 if self.config.jetstream else 0):
            self._check_large(len(data))
        self._publisher.publish(name, data, max_payload)

    def _check_large(self, size: int) -> None:
        if not self._js_available:
            raise PayloadTooLargeError(
                f"payload of {size} bytes exceeds the NATS server's max_payload "
                f"({self._max_payload} bytes) and the server has no JetStream to carry it: "
                "raise max_payload in the nats-server configuration (up to 64 MB) or "
                "start nats-server with JetStream (-js)"
            )
        if size > self.config.large_frame_store_bytes // 2:
            raise PayloadTooLargeError(
                f"payload of {size} bytes exceeds half of the large-frame store "
                f"({self.config.large_frame_store_bytes} bytes); raise "
                "MSIGHT_NATS_LARGE_FRAME_STORE_BYTES"
            )
        if not self._large._ready:
            self._loop.run(
                self._large.ensure_stream(self._nc),
                self.config.publish.timeout,
                "create the large-frame stream",
            )

    def _flush(self, timeout: float | None) -> None:
        if self._nc is None:
            return
        budget = self.config.publish.timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        self._publisher.wait_drained(budget)
        remaining = max(deadline - time.monotonic(), 0.05)
        try:
            self._loop.run(self._nc.flush(remaining), remaining + 0.5, "flush")
        except MsightError as exc:
            from ..errors import BackpressureError

            raise BackpressureError(f"flush: {exc}") from None

    def _close(self) -> None:
        _live.discard(self)
        if self._nc is None:
            return
        try:
            self._publisher.wait_drained(self.config.publish.timeout)
        except MsightError as exc:
            buffered, unacked = self._publisher.pending()
            logger.warning(
                "closing NATS with %d message(s) unsent and %d unacknowledged: %s",
                buffered,
                unacked,
                exc,
            )
        self._closing = True
        self._publisher.begin_close()
        try:
            self._loop.run(self._nc.close(), self.config.publish.timeout, "close")
        except MsightError:
            logger.debug("closing the NATS connection failed", exc_info=True)
        finally:
            self._loop.stop()

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        pub = self._publisher
        buffered, unacked = pub.pending()
        out.update(
            published=pub.published,
            possibly_lost=pub.possibly_lost,
            publish_buffered=buffered,
            unacknowledged=unacked,
            resent=pub.resent,
            publish_retried=pub.retried,
            publish_failed=pub.failed,
            large_frames_sent=pub.frames,
            large_frames_received=self._large.fetched,
            large_frames_lost=self._large.lost,
            reconnects=self.reconnects,
            outage_seconds=round(self.outage_seconds, 3),
            slow_consumer_drops=self.slow_consumer_drops,
        )
        return out


class NATSJetStreamPubSub(NATSPubSub):
    """NATS with JetStream: durable, at-least-once, replay for returning groups.

    Built by ``NATSPubSub(config)`` when ``config.jetstream`` is set
    (``MSIGHT_NATS_JETSTREAM=true``). Each topic is stored in a stream (an existing
    one covering the subject, or ``MSIGHT_<topic>_<hash>``). With ``group_id`` the
    subscription binds to the durable consumer named after it, shared by all
    members (each message to one member) and resumed after restarts; without it,
    each subscriber gets its own consumer starting at new messages.
    """

    capabilities = Capabilities(broadcast=True, groups=True, persistent=True, ordered=True)

    def _stream_for(self, name: str) -> str:
        stream = self._streams.get(name)
        if stream is None:
            cfg = self.config
            stream = self._loop.run(
                ensure_topic_stream(
                    self._nc,
                    name,
                    cfg.stream_max_age,
                    cfg.stream_max_bytes,
                    cfg.publish.timeout,
                    cfg.stream_replicas,
                ),
                cfg.publish.timeout,
                f"create the stream for {name!r}",
            )
            self._streams[name] = stream
        return stream

    def _publish(self, name: str, data: bytes) -> None:
        if self._nc is None:
            self._ensure_connected()
        if name not in self._streams:
            self._stream_for(name)
        super()._publish(name, data)

    def _subscribe(self, name: str) -> None:
        self._ensure_connected()
        stream = self._stream_for(name)
        timeout = self.config.publish.timeout
        self._loop.run(self._js_subscribe(name, stream), timeout, f"subscribe to {name!r}")

    async def _js_subscribe(self, name: str, stream: str) -> None:
        api = nats.js.api
        cfg = self.config
        group = self.group_id
        consumer = api.ConsumerConfig(
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=cfg.ack_wait,
            max_ack_pending=min(1000, cfg.queue.max_messages),
            deliver_policy=api.DeliverPolicy.ALL if group else api.DeliverPolicy.NEW,
        )
        js = self._nc.jetstream(timeout=cfg.publish.timeout)
        if group:
            durable = durable_name(group)
            sub = await js.subscribe(
                name,
                queue=durable,
                durable=durable,
                stream=stream,
                cb=self._on_message,
                manual_ack=True,
                config=consumer,
                pending_msgs_limit=_SUB_PENDING_MSGS,
                pending_bytes_limit=_SUB_PENDING_BYTES,
            )
        else:
            sub = await js.subscribe(
                name,
                stream=stream,
                cb=self._on_message,
                manual_ack=True,
                config=consumer,
                pending_msgs_limit=_SUB_PENDING_MSGS,
                pending_bytes_limit=_SUB_PENDING_BYTES,
            )
        self._subs[name] = sub
        # Deliveries skip nats-py's Msg object, queue and task, as in core mode,
        # unless the consumer (ours never do; one made elsewhere may) uses idle
        # heartbeats or flow control, which nats-py tracks on its own path.
        consumer_config = getattr(getattr(sub._sub, "_jsi", None), "_ccreq", None)
        if (
            self._parser is not None
            and consumer_config is not None
            and not consumer_config.idle_heartbeat
            and not consumer_config.flow_control
        ):
            self._parser.route(sub._sub, self._deliver_acked, _FRAME_MARKER)
        await self._nc.flush(cfg.connect_timeout)

    def _deliver_acked(self, subject: str, data: bytes, reply: bytes) -> None:
        """On the loop: a routed JetStream delivery; ``reply`` is its ack subject."""
        self._collect(Delivery(subject, data, self._token(reply.decode())))

    def __init__(self, config: NatsConfig | None = None) -> None:
        super().__init__(config)
        # Delivered to us but not yet acknowledged (queued or in the application's
        # hands): negatively acknowledged on close so the group gets them at once.
        self._outstanding: dict[str, None] = {}
        self._acks: list[bytes] = []  # processed, acknowledgement not yet handed over

    def _token(self, reply: str) -> Any:
        if not reply:
            return None
        self._outstanding[reply] = None
        return reply

    async def _drain_subscriptions(self) -> None:
        subs = list(self._subs.values())
        self._subs.clear()
        for sub in subs:
            await sub.drain()  # UNSUB, round trip, and the callback sees what came before

    def _lost_frame(self, msg: Any) -> None:
        if msg.reply:
            self._publisher.send_raw(b"PUB %s 0\r\n\r\n" % msg.reply.encode())

    def _ack(self, delivery: Delivery) -> None:
        # Held back and sent in one piece when the application has gone through
        # what it took from the queue (or _ACK_BATCH of them): one hand-over to
        # the loop per batch instead of a loop wake-up per message.
        self._outstanding.pop(delivery.token, None)
        self._acks.append(b"PUB %s 0\r\n\r\n" % delivery.token.encode())
        if len(self._acks) >= _ACK_BATCH:
            self._ack_flush()

    def _ack_flush(self) -> None:
        if not self._acks:
            return
        acks, self._acks = self._acks, []
        try:
            self._publisher.send_raw(b"".join(acks))
        except ClosedError:
            logger.debug("%d ack(s) after close dropped; redelivered later", len(acks))

    def _close(self) -> None:
        self._ack_flush()
        if self._nc is not None and self._subs and self._nc.is_connected:
            # Stop deliveries before leaving: the server removes our interest (so it
            # stops pushing to an inbox about to vanish, where messages would wait
            # ack_wait for redelivery) and what it had already sent reaches the
            # callback, to be returned to the group below.
            try:
                self._loop.run(
                    self._drain_subscriptions(), self.config.publish.timeout, "stop deliveries"
                )
            except MsightError:
                logger.debug("stopping JetStream deliveries failed", exc_info=True)
        if self._nc is not None and self._outstanding:
            tokens = list(self._outstanding)
            self._outstanding.clear()
            for reply in tokens:
                self._publisher.send_raw(b"PUB %s 4\r\n-NAK\r\n" % reply.encode())
            logger.debug("returned %d unprocessed message(s) to JetStream", len(tokens))
        super()._close()
