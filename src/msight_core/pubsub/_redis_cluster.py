"""Redis Cluster backend: sharded pub/sub (``SPUBLISH``/``SSUBSCRIBE``).

Selected by ``RedisPubSub`` when ``MSIGHT_REDIS_MESSAGE_BROKER_USE_CLUSTER`` is
true or when it is handed a ``redis.RedisCluster`` client. Plain ``PUBLISH`` in
a cluster is broadcast to every node over the cluster bus, so each frame would
cross every link; sharded pub/sub keeps a channel's traffic on the shard that
owns its hash slot. Needs Redis 7+ or Valkey 7+; older servers are refused with
:class:`~msight_core.errors.ShardedPubSubUnsupportedError` on first use.

The design is the single-node backend's, spread over several nodes:

* one writer thread batches ``publish()`` calls, groups each batch by the
  master that owns the channel's slot, sends one write per node and reads the
  replies in bulk. A ``MOVED`` reply updates the slot map and the message is
  sent again to the new owner; ``CLUSTERDOWN``/``TRYAGAIN`` are retried after a
  short back-off. While a master is unreachable its messages stay buffered
  (bounded by ``PublishConfig.buffer_bytes``) and the slot map is reloaded until
  a replica has taken over;
* one reader thread polls one connection per master that owns a subscribed
  channel. When that connection drops, or the server says ``sunsubscribe``
  because the slot moved, the reader reloads the slot map and subscribes again
  on the new owner by itself. Messages published in between are lost, as with
  any Redis pub/sub outage; the pause is logged and counted in ``stats()``.
"""

from __future__ import annotations

import dataclasses
import logging
import select
import socket
import threading
import time
from typing import Any

from ..config import RedisConfig, load_redis_config
from ..errors import (
    AuthenticationError,
    BrokerUnavailableError,
    ConfigError,
    MsightError,
    ShardedPubSubUnsupportedError,
)
from ._core import Delivery, QueueBackend, ReceiveQueue
from ._redis_cluster_pub import ClusterPublisher
from ._redis_conn import (
    Endpoint,
    ReplyStream,
    connect,
    endpoint_from_config,
    endpoint_from_kwargs,
    hiredis,
)
from ._redis_conn import pack_command as _pack
from ._redis_slots import SlotMap, parse_node
from .redis import RedisPubSub

__all__ = ["RedisClusterPubSub", "ShardedPubSubUnsupportedError", "cluster_seeds", "is_cluster"]

logger = logging.getLogger("msight_core.pubsub.redis")

_RETRY_MIN, _RETRY_MAX = 0.05, 0.25
_CLOSE_TIMEOUT = 5.0
_FATAL = (AuthenticationError, ShardedPubSubUnsupportedError, ConfigError)


def is_cluster(client: Any, config: RedisConfig | None) -> bool:
    """True when ``RedisPubSub(client, config)`` should run in cluster mode."""
    if isinstance(client, RedisConfig):
        return client.use_cluster
    if client is None:
        return (config or load_redis_config()).use_cluster
    return getattr(client, "nodes_manager", None) is not None


def cluster_seeds(client: Any, config: RedisConfig) -> list[Endpoint]:
    """The nodes to ask for the slot map first, with credentials and TLS settings.

    Raises:
        ConfigError: a node entry is malformed.
    """
    manager = getattr(client, "nodes_manager", None)
    if manager is not None:  # a redis.RedisCluster: reuse its nodes and credentials
        kwargs = dict(manager.connection_kwargs)
        nodes = list(manager.startup_nodes.values()) + list(manager.nodes_cache.values())
        out: list[Endpoint] = []
        for node in nodes:
            endpoint = endpoint_from_kwargs({**kwargs, "host": node.host, "port": node.port})
            if endpoint not in out:
                out.append(endpoint)
        return out
    base = endpoint_from_config(config)
    entries = config.cluster_nodes or (f"{config.host}:{config.port}",)
    seeds = []
    for entry in entries:
        host, port = parse_node(entry)
        seeds.append(dataclasses.replace(base, host=host, port=port))
    return seeds


class _SubConn:
    """One subscribing connection to one master."""

    def __init__(self, endpoint: Endpoint, sock: socket.socket) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.stream = ReplyStream(sock)
        self.names: set[str] = set()
        self.is_tls = hasattr(sock, "pending")


class _ClusterSubscriber:
    """Connections to the masters owning subscribed channels, drained by one thread."""

    def __init__(self, slots: SlotMap, queue: ReceiveQueue, timeout: float) -> None:
        self.slots = slots
        self.queue = queue
        self.timeout = timeout
        self._lock = threading.Lock()
        self._wanted: dict[str, threading.Event] = {}
        self._unplaced: dict[str, None] = {}  # ordered set, reader thread and subscribe()
        self._conns: dict[Endpoint, _SubConn] = {}
        self._fatal: MsightError | None = None
        self._need_refresh = False
        self._retry_at = 0.0
        self._retry_wait = _RETRY_MIN
        self._lost_at: float | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.reconnects = 0
        self.resubscribes = 0
        self.outage_seconds = 0.0

    # -- caller side ----------------------------------------------------------------

    def subscribe(self, name: str) -> None:
        if not self.slots.loaded:
            self.slots.refresh(force=True)
        event = threading.Event()
        with self._lock:
            self._wanted[name] = event
            self._unplaced[name] = None
            start = self._thread is None
            if start:
                self._thread = threading.Thread(
                    target=self._run, name="msight-redis-cluster-reader", daemon=True
                )
        if start:
            self._thread.start()  # type: ignore[union-attr]
        else:
            self._wake()
        if not event.wait(self.timeout) or self._fatal is not None:
            with self._lock:
                self._wanted.pop(name, None)
                self._unplaced.pop(name, None)
            if self._fatal is not None:
                raise type(self._fatal)(str(self._fatal))
            raise BrokerUnavailableError(
                f"Redis Cluster did not confirm SSUBSCRIBE {name} within {self.timeout:g}s"
            )

    def close(self) -> None:
        self._closed = True
        self._wake()
        if self._thread is not None:
            self._thread.join(_CLOSE_TIMEOUT)
        for conn in list(self._conns.values()):
            conn.sock.close()
        self._wake_r.close()
        self._wake_w.close()

    @property
    def connections(self) -> list[str]:
        return [c.endpoint.address for c in list(self._conns.values())]

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # -- reader thread --------------------------------------------------------------

    def _run(self) -> None:
        while not self._closed:
            if self._unplaced and time.monotonic() >= self._retry_at:
                try:
                    self._place()
                except _FATAL as exc:
                    self._fail(exc)
                    return
            conns = list(self._conns.values())
            ready = [c for c in conns if c.is_tls and c.sock.pending()]  # type: ignore[attr-defined]
            if not ready:
                ready = self._poll(conns)
            for conn in ready:
                try:
                    self._read(conn)
                except (OSError, hiredis.ProtocolError) as exc:
                    if self._closed:
                        return
                    self._lost(conn, exc)

    def _poll(self, conns: list[_SubConn]) -> list[_SubConn]:
        timeout_ms = None
        if self._unplaced:
            timeout_ms = max(0, int((self._retry_at - time.monotonic()) * 1000))
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        by_fd = {}
        for conn in conns:
            by_fd[conn.sock.fileno()] = conn
            poller.register(conn.sock, select.POLLIN)
        ready = []
        for fd, _ in poller.poll(timeout_ms):
            if fd == self._wake_r.fileno():
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
            elif fd in by_fd:
                ready.append(by_fd[fd])
        return ready

    def _place(self) -> None:
        """Subscribe every unplaced channel on the master that owns its slot."""
        if self._need_refresh or not self.slots.loaded:
            try:
                self.slots.refresh()
                self._need_refresh = False
            except BrokerUnavailableError as exc:
                if isinstance(exc, AuthenticationError):
                    raise
                self._back_off()
                logger.debug("slot map refresh failed: %s", exc)
                return
        with self._lock:
            names = list(self._unplaced)
        by_node: dict[Endpoint, list[str]] = {}
        for name in names:
            owner = self.slots.owner(self.slots.slot(name))
            if owner is None:
                self._need_refresh = True
                continue
            by_node.setdefault(owner, []).append(name)
        for endpoint, group in by_node.items():
            conn = self._conns.get(endpoint)
            try:
                if conn is None:
                    conn = self._conns[endpoint] = _SubConn(endpoint, connect(endpoint))
                conn.sock.sendall(b"".join(_pack(b"SSUBSCRIBE", n.encode()) for n in group))
            except (OSError, BrokerUnavailableError) as exc:
                if isinstance(exc, AuthenticationError):
                    raise
                if conn is not None:
                    self._lost(conn, exc)
                self._need_refresh = True
                continue
            with self._lock:
                for name in group:
                    self._unplaced.pop(name, None)
            conn.names.update(group)
        if self._unplaced:
            self._back_off()
        else:
            self._retry_wait = _RETRY_MIN

    def _back_off(self) -> None:
        self._retry_at = time.monotonic() + self._retry_wait
        self._retry_wait = min(self._retry_wait * 2, _RETRY_MAX)

    def _read(self, conn: _SubConn) -> None:
        batch: list[Delivery] = []
        for reply in conn.stream.read():
            if type(reply) is list and len(reply) == 3:
                kind = reply[0]
                if kind == b"smessage":
                    batch.append(Delivery(reply[1].decode(), reply[2]))
                    continue
                self._control(conn, kind, reply[1].decode())
            elif isinstance(reply, hiredis.ReplyError):
                self._refused(conn, str(reply))
        if batch:
            self.queue.put_many(batch)

    def _control(self, conn: _SubConn, kind: bytes, name: str) -> None:
        if kind == b"ssubscribe":
            event = self._wanted.get(name)
            if event is not None:
                event.set()
            if self._lost_at is not None and not self._unplaced:
                outage = time.monotonic() - self._lost_at
                self.outage_seconds += outage
                self._lost_at = None
                logger.warning(
                    "subscriber moved to %s after %.2fs; subscribed again to %s",
                    conn.endpoint.address,
                    outage,
                    ", ".join(sorted(conn.names)),
                )
        elif kind == b"sunsubscribe" and name in self._wanted:
            # The server dropped us: the slot moved to another node (failover or
            # resharding). Find the new owner.
            conn.names.discard(name)
            self._orphan([name], f"slot of {name} moved away from {conn.endpoint.address}")

    def _refused(self, conn: _SubConn, text: str) -> None:
        if text.startswith("MOVED "):
            _, slot_text, address = text.split(" ", 2)
            slot = int(slot_text)
            self.slots.moved(slot, address)
            moved = [n for n in conn.names if self.slots.slot(n) == slot]
            conn.names.difference_update(moved)
            with self._lock:
                self._unplaced.update(dict.fromkeys(moved))
            self._retry_at = 0.0
        elif text.lower().startswith("err unknown command"):
            self._fail(
                ShardedPubSubUnsupportedError(
                    f"{conn.endpoint.address} does not know SSUBSCRIBE (needs Redis 7+ or Valkey)"
                )
            )
        else:
            logger.error("Redis Cluster refused a subscription on %s: %s", conn.endpoint, text)

    def _lost(self, conn: _SubConn, exc: BaseException) -> None:
        conn.sock.close()
        self._conns.pop(conn.endpoint, None)
        names = sorted(conn.names)
        conn.names.clear()
        problem = exc if isinstance(exc, MsightError) else type(exc).__name__
        self._orphan(names, f"lost {conn.endpoint.address} ({problem})")

    def _orphan(self, names: list[str], why: str) -> None:
        if not names:
            return
        with self._lock:
            self._unplaced.update(dict.fromkeys(names))
        self._need_refresh = True
        self._retry_at = 0.0
        self._retry_wait = _RETRY_MIN
        if self._lost_at is None:
            self._lost_at = time.monotonic()
            self.reconnects += 1
            logger.warning(
                "subscriber %s on %s; finding the new owner. Messages published meanwhile "
                "are lost (Redis pub/sub is best-effort)",
                why,
                ", ".join(names),
            )
        self.resubscribes += len(names)

    def _fail(self, exc: MsightError) -> None:
        logger.error("%s; subscriber stopped", exc)
        self._fatal = exc
        self.queue.fail(exc)
        for event in list(self._wanted.values()):
            event.set()


class RedisClusterPubSub(RedisPubSub):
    """Redis Cluster pub/sub over sharded channels; created through ``RedisPubSub``.

    Args:
        client: a ``redis.RedisCluster`` (e.g. :func:`msight_core.utils.get_redis_client`
            with ``use_cluster``), a :class:`~msight_core.config.RedisConfig` with
            ``use_cluster=True``, or ``None`` for the environment.
        config: queue and publish bounds (defaults from the environment).

    No connection is made until the first ``subscribe()`` or ``publish()``.
    """

    def __init__(self, client: Any = None, config: RedisConfig | None = None) -> None:
        if isinstance(client, RedisConfig):
            config, client = client, None
        config = config or load_redis_config()
        seeds = cluster_seeds(client, config)
        QueueBackend.__init__(self, config.queue)
        self.config = config
        self.endpoint = seeds[0]
        self._slots = SlotMap(seeds)
        self._cluster_publisher = ClusterPublisher(
            self._slots, config.publish.buffer_bytes, config.publish.timeout
        )
        self._cluster_subscriber: _ClusterSubscriber | None = None
        self._prefixes: dict[str, bytes] = {}
        self._checked = False

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        seeds = ",".join(e.address for e in self._slots._known[:3])
        return f"<RedisPubSub cluster {seeds} {state} topics={list(self.topics)}>"

    def _check_server(self) -> None:
        # One round trip on first use, so a server without sharded pub/sub or
        # not in cluster mode is reported to the caller, not to a log line.
        if not self._checked:
            try:
                self._slots.refresh(force=True)
            except _FATAL:
                raise
            except BrokerUnavailableError as exc:  # buffer and retry, like one node
                logger.warning("%s; publishing will retry", exc)
            self._checked = True

    def _subscribe(self, name: str) -> None:
        if self._cluster_subscriber is None:
            self._cluster_subscriber = _ClusterSubscriber(
                self._slots, self._queue, max(self.endpoint.connect_timeout, 5.0)
            )
        self._cluster_subscriber.subscribe(name)
        self._checked = True

    def _publish(self, name: str, data: bytes) -> None:
        prefix = self._prefixes.get(name)
        if prefix is None:
            self._check_server()
            raw = name.encode()
            prefix = self._prefixes[name] = b"*3\r\n$8\r\nSPUBLISH\r\n$%d\r\n%s\r\n" % (
                len(raw),
                raw,
            )
        self._cluster_publisher.publish(name, prefix, data)

    def _flush(self, timeout: float | None) -> None:
        self._cluster_publisher.flush(timeout)

    def _close(self) -> None:
        try:
            self._cluster_publisher.close(self.config.publish.timeout)
        finally:
            if self._cluster_subscriber is not None:
                self._cluster_subscriber.close()

    def stats(self) -> dict[str, Any]:
        out = QueueBackend.stats(self)
        pub = self._cluster_publisher
        out.update(
            published=pub.published,
            unrouted=pub.unrouted,
            possibly_lost=pub.possibly_lost,
            redirected=pub.redirected,
            publisher_reconnects=pub.reconnects,
            slot_map_refreshes=self._slots.refreshes,
        )
        sub = self._cluster_subscriber
        if sub is not None:
            out.update(
                subscriber_reconnects=sub.reconnects,
                resubscribes=sub.resubscribes,
                outage_seconds=round(sub.outage_seconds, 3),
                subscribed_on=sub.connections,
            )
        return out
