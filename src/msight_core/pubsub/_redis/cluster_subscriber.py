"""Redis Cluster, subscribing side: sharded pub/sub (``SSUBSCRIBE``).

Plain ``PUBLISH`` in a cluster is broadcast to every node over the cluster bus,
so each frame would cross every link; sharded pub/sub keeps a channel's traffic
on the shard that owns its hash slot. Needs Redis 7+ or Valkey 7+.

One reader thread polls one connection per master that owns a subscribed
channel. When that connection drops, or the server says ``sunsubscribe``
because the slot moved, the reader reloads the slot map and subscribes again on
the new owner by itself. Messages published in between are lost, as with any
Redis pub/sub outage; the pause is logged and counted in ``stats()``.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from typing import Any

from ...errors import (
    AuthenticationError,
    BrokerUnavailableError,
    ConfigError,
    MsightError,
    ShardedPubSubUnsupportedError,
)
from .._core import Delivery, ReceiveQueue
from .outbox import BACKOFF_MIN, CLOSE_TIMEOUT, CLUSTER_RETRY_MAX
from .reader import ReplyStream
from .slots import SlotMap
from .wire import Endpoint, connect, hiredis, pack_command

__all__ = ["Subscriber"]

logger = logging.getLogger("msight_core.pubsub.redis")

_FATAL = (AuthenticationError, ShardedPubSubUnsupportedError, ConfigError)


class _SubConn:
    """One subscribing connection to one master."""

    def __init__(self, endpoint: Endpoint, sock: socket.socket) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.stream = ReplyStream(sock)
        self.names: set[str] = set()
        self.is_tls = hasattr(sock, "pending")


class Subscriber:
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
        self._retry_wait = BACKOFF_MIN
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
            self._thread.join(CLOSE_TIMEOUT)
        for conn in list(self._conns.values()):
            conn.sock.close()
        self._wake_r.close()
        self._wake_w.close()

    @property
    def connections(self) -> list[str]:
        return [c.endpoint.address for c in list(self._conns.values())]

    def stats(self) -> dict[str, Any]:
        """Counters for ``RedisPubSub.stats()``."""
        return {
            "subscriber_reconnects": self.reconnects,
            "resubscribes": self.resubscribes,
            "outage_seconds": round(self.outage_seconds, 3),
            "subscribed_on": self.connections,
        }

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
                conn.sock.sendall(b"".join(pack_command(b"SSUBSCRIBE", n.encode()) for n in group))
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
            self._retry_wait = BACKOFF_MIN

    def _back_off(self) -> None:
        self._retry_at = time.monotonic() + self._retry_wait
        self._retry_wait = min(self._retry_wait * 2, CLUSTER_RETRY_MAX)

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
        self._retry_wait = BACKOFF_MIN
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
