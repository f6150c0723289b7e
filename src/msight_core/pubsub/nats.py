"""NATS backend: a synchronous facade over nats-py, for real-time sensor streams.

Each :class:`NATSPubSub` runs one asyncio event loop on a daemon thread. From
any thread, ``publish()`` formats the NATS command and appends it to a buffer
that a writer coroutine hands to nats-py in batches, so there is no loop
hand-off or round trip per message. Received messages go from a faster protocol
parser straight into the bounded receive queue read by ``listen()`` /
``receive()``, a batch per socket read.

* **Groups.** With ``group_id``, subscriptions join the NATS queue group of that
  name: each message goes to one member. Without it, every subscriber gets all.
* **Payloads** go on the wire unchanged: a plain NATS subscriber reads exactly
  the published bytes. A payload above the server's ``max_payload`` (1 MB by
  default) goes in chunks on a side subject, followed by a small header-only
  notice on the topic: msight broadcast subscribers reassemble it, a queue-group
  member asks the publisher for it (no JetStream needed). In JetStream mode the
  chunks are stored in a stream instead.
* **Reconnects** are nats-py's (subscriptions and queue groups are restored);
  while disconnected, publishes wait in our buffer (``PublishConfig``), which
  also bounds JetStream messages sent and not yet acknowledged.
* **Bursts.** The subscriber reads its socket directly into its parser's buffer
  (a large payload into one reused buffer), so it drains about as fast as a
  publisher on the same machine sends; a publisher paces large payloads with a
  PING round trip per 4 MiB, so a burst does not outrun what the server holds
  for a subscriber (``max_pending``, 64 MB) before it disconnects it.
* **Peers are untrusted.** What the server sends is checked (sizes, line
  lengths, the CRLF after a payload; a violation drops the connection, which
  reconnects); a message nats-py cannot take, or a forged large-frame notice,
  is dropped and counted (``malformed_dropped``, ``large_frames_lost``) and
  costs its subscription at most a short wait. With
  ``MSIGHT_QUEUE_OVERFLOW=block`` the wait for queue room happens off the event
  loop; past a bounded hand-off the socket is no longer read.
* **JetStream mode** (``MSIGHT_NATS_JETSTREAM=true``): each topic is stored in a
  stream, publishes are acknowledged by the server (and resent, de-duplicated,
  when the ack is late), and a group's durable consumer, named after
  ``group_id``, resumes where the group left off. A message is acknowledged
  when the application asks for the next one (or closes the backend), and
  ``capabilities.persistent`` is true.

* **Trace context.** With ``opentelemetry-api`` installed and a tracer provider
  set, a publish inside a span carries W3C ``traceparent``/``tracestate``
  headers (an ``HPUB``; the payload is unchanged); a received message's are
  kept (checked, bounded) for ``received_headers()`` (:mod:`msight_core.tracing`).

:class:`NATSLoopClient` is the same machinery with nats-py on the caller's own
event loop, no thread: the engine of :class:`msight_core.aio.AsyncNATSPubSub`.

The machinery lives in the private package :mod:`msight_core.pubsub._nats`:
:class:`~._nats.publisher.Publisher` and :class:`~._nats.subscriber.Subscriber`,
the mode (core or JetStream) in :mod:`~._nats.modes`, and the only uses of
nats-py's private API, each checked and with a public fallback, in
:mod:`~._nats.internals`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import time
import weakref
from typing import Any

from ..config import NatsConfig, load_nats_config
from ..errors import BackpressureError, MsightError
from ._core import Delivery, QueueBackend
from ._nats.frames import LINGER_SECONDS
from ._nats.internals import confirm
from ._nats.modes import CoreMode
from ._nats.native import LoopClient as NATSLoopClient
from ._nats.parts import assemble, counters, trace_lines
from .base import Capabilities

__all__ = ["NATSLoopClient", "NATSPubSub"]

logger = logging.getLogger(__name__)

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
            With ``config.jetstream`` the instance runs in JetStream mode:
            durable, at-least-once, and its ``capabilities.persistent`` is true.

    No connection is made until the first ``subscribe()`` or ``publish()``;
    that call raises :class:`~msight_core.errors.BrokerUnavailableError` (or
    :class:`~msight_core.errors.AuthenticationError`) if the server cannot be
    reached.
    """

    #: Core NATS; an instance in JetStream mode has its own (persistent).
    capabilities = CoreMode.capabilities

    def __init__(self, config: NatsConfig | None = None) -> None:
        if config is None:
            config = load_nats_config()
        if not isinstance(config, NatsConfig):
            raise TypeError(
                f"NATSPubSub expects a NatsConfig (get_nats_config()), got {type(config).__name__}"
            )
        super().__init__(config.queue)
        self.config = config
        self.group_id = config.group_id
        parts = self._parts = assemble(config, self._queue.put_many, self._queue.fail)
        self._conn = parts.conn  # ConfigError early (TLS files, auth settings)
        self.servers_shown = parts.conn.where
        self._large = parts.large
        self._publisher = parts.publisher
        self._mode = parts.mode
        self.capabilities: Capabilities = parts.mode.capabilities
        self._subscriber = parts.subscriber
        self._listeners = parts.listeners

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("connected" if self._conn.client else "idle")
        mode = " jetstream" if self.config.jetstream else ""
        return (
            f"<{type(self).__name__} {self.servers_shown}{mode} group_id={self.group_id!r} "
            f"{state} topics={list(self.topics)}>"
        )

    @property
    def connection_state(self) -> str:
        """``"connected"``, ``"disconnected for 2.5s"``, ``"not connected"`` ..."""
        return self._conn.describe()

    @property
    def reconnects(self) -> int:
        return self._conn.reconnects

    @property
    def slow_consumer_drops(self) -> int:
        return self._conn.slow_consumer_drops

    @property
    def outage_seconds(self) -> float:
        return self._conn.outage_seconds

    # -- the backend hooks --------------------------------------------------------

    def _connect(self) -> None:
        self._check_open()
        if self._conn.open(self._listeners):
            _live.add(self)

    def _subscribe(self, name: str) -> None:
        self._connect()
        self._mode.prepare(name)
        self._conn.run(
            self._subscriber.subscribe(name), self._mode.subscribe_timeout, f"subscribe to {name!r}"
        )

    def _subscribe_pattern(self, pattern: str) -> None:
        # Core NATS only (capabilities.patterns): a JetStream topic is one stream.
        self._connect()
        self._conn.run(
            self._subscriber.subscribe(pattern),
            self._mode.subscribe_timeout,
            f"subscribe to {pattern!r}",
        )

    def _publish(self, name: str, data: bytes) -> None:
        conn = self._conn
        if conn.client is None:
            self._connect()
        mode = self._mode
        mode.prepare(name)
        max_payload = conn.max_payload
        if len(data) > max_payload - mode.headroom:
            self._large.admit(
                len(data), max_payload, conn.jetstream_available, conn.run, conn.client
            )
        self._publisher.publish(name, data, max_payload, trace_lines())

    def _flush(self, timeout: float | None) -> None:
        conn = self._conn
        if conn.client is None:
            return
        budget = self.config.publish.timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        self._publisher.wait_drained(budget)
        remaining = max(deadline - time.monotonic(), 0.05)
        try:
            conn.run(confirm(conn.client, remaining), remaining + 0.5, "flush")
        except MsightError as exc:
            raise BackpressureError(f"flush: {exc}") from None
        self._publisher.raise_error()  # a refusal comes before the round trip's PONG

    def _ack(self, delivery: Delivery) -> None:
        self._mode.ack(delivery.token)

    def _ack_flush(self) -> None:
        self._mode.ack_flush()

    def _close(self) -> None:
        _live.discard(self)
        self._subscriber.close()  # the queue is closed: nothing more goes into it
        conn = self._conn
        if conn.client is None:
            return
        subscriber = self._subscriber
        self._mode.stop(subscriber.drain if subscriber.topics() else None)
        publisher = self._publisher
        timeout = self.config.publish.timeout
        try:
            publisher.wait_drained(timeout)
        except MsightError as exc:
            buffered, unacked = publisher.pending()
            logger.warning(
                "closing NATS with %d message(s) unsent and %d unacknowledged: %s",
                buffered,
                unacked,
                exc,
            )
        with contextlib.suppress(MsightError):  # the frames queue-group members ask for
            conn.run(self._large.linger(LINGER_SECONDS), LINGER_SECONDS + 1, "linger")
        conn.begin_close()
        publisher.begin_close()
        conn.close(timeout)

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out.update(counters(self._parts))
        return out
