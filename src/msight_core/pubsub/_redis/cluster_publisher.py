"""Redis Cluster, publishing side: sharded pub/sub (``SPUBLISH``).

``publish()`` appends to one outgoing buffer; a writer thread takes whatever has
accumulated, groups it by the master owning each channel's slot, writes one
batch per node and reads the replies in bulk, so there is no round trip per
message. Replies are matched to messages in order (a node answers in order), so
a ``MOVED``, ``CLUSTERDOWN`` or ``TRYAGAIN`` reply sends exactly that message
again, after the slot map is corrected.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from typing import Any

from ...errors import (
    AuthenticationError,
    BrokerUnavailableError,
    ConfigError,
    MsightError,
    ShardedPubSubUnsupportedError,
)
from .outbox import BACKOFF_MIN, CLUSTER_RETRY_MAX, RECV_CHUNK, REPLY_HIGH_WATER, Outbox
from .slots import SlotMap
from .wire import Endpoint, connect, hiredis, send_buffers

__all__ = ["Publisher"]

logger = logging.getLogger("msight_core.pubsub.redis")

_RETRYABLE = ("MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN", "LOADING", "MASTERDOWN")
_FATAL = (AuthenticationError, ShardedPubSubUnsupportedError, ConfigError)

# One message: (channel name, RESP header up to the payload length, payload).
_Entry = tuple[str, bytes, bytes]


class _Node:
    """The writer's connection to one master and what it awaits replies for."""

    def __init__(self, endpoint: Endpoint, sock: socket.socket) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.reader = hiredis.Reader()
        self.inflight: deque[_Entry] = deque()


class Publisher(Outbox):
    """Outgoing buffer plus the writer thread that owns one socket per master."""

    where = "the Redis Cluster"
    thread_name = "msight-redis-cluster-writer"

    def __init__(self, slots: SlotMap, buffer_bytes: int, timeout: float) -> None:
        super().__init__(buffer_bytes, timeout)
        self.slots = slots
        self._nodes: dict[Endpoint, _Node] = {}
        self._prefixes: dict[str, bytes] = {}
        self._checked = False
        self.redirected = 0

    # -- caller side ----------------------------------------------------------------

    def publish(self, name: str, data: bytes) -> None:
        """Queue one message; blocks only while the outage buffer is full.

        Raises:
            BackpressureError: no room in the buffer within the publish timeout.
            AuthenticationError, ShardedPubSubUnsupportedError: publishing stopped.
            ConfigError: the server is not in cluster mode (first publish).
        """
        prefix = self._prefixes.get(name)
        if prefix is None:
            self.check_server()
            raw = name.encode()
            prefix = b"*3\r\n$8\r\nSPUBLISH\r\n$%d\r\n%s\r\n" % (len(raw), raw)
            if len(self._prefixes) < 10_000:
                self._prefixes[name] = prefix
        size = len(data)
        with self._cond:
            self._admit(size)
            self._pending.append((name, b"%s$%d\r\n" % (prefix, size), data))
            self._accepted(size)
            if len(self._pending) == 1:
                self._cond.notify_all()

    def check_server(self) -> None:
        """One round trip on first use, so that a server without sharded pub/sub,
        or not in cluster mode, is reported to the caller rather than to a log line.

        Raises:
            AuthenticationError, ShardedPubSubUnsupportedError, ConfigError.
        """
        if self._checked:
            return
        try:
            self.slots.refresh(force=True)
        except _FATAL:
            raise
        except BrokerUnavailableError as exc:  # buffer and retry, like one node
            logger.warning("%s; publishing will retry", exc)
        self._checked = True

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out.update(redirected=self.redirected, slot_map_refreshes=self.slots.refreshes)
        return out

    def _interrupt(self) -> None:
        for node in list(self._nodes.values()):
            try:
                node.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- writer thread --------------------------------------------------------------

    def _run(self) -> None:
        backoff = BACKOFF_MIN
        try:
            while True:
                with self._cond:
                    while not self._pending and not self._unreplied and not self._closing:
                        self._cond.wait()
                    if self._abort or (self._closing and not self._pending and not self._unreplied):
                        return
                    batch, self._pending = self._pending, []
                try:
                    stalled = self._send(batch)
                except _FATAL as exc:
                    with self._cond:
                        self._fatal = exc
                        self._cond.notify_all()
                    logger.error("%s; publishing stopped", exc)
                    return
                if stalled:
                    with self._cond:
                        if self._abort:
                            return
                        self._cond.wait(backoff)
                    backoff = min(backoff * 2, CLUSTER_RETRY_MAX)
                else:
                    backoff = BACKOFF_MIN
        finally:
            for node in list(self._nodes.values()):
                node.sock.close()
            self._nodes.clear()

    def _send(self, batch: list[_Entry]) -> bool:
        """Route, write and (in bulk) confirm ``batch``; True if something must wait."""
        slots = self.slots
        owner, slot_of = slots.owner, slots.slot
        groups: dict[Endpoint, list[_Entry]] = {}
        held: list[_Entry] = []
        for entry in batch:
            endpoint = owner(slot_of(entry[0]))
            if endpoint is None:
                held.append(entry)
            else:
                group = groups.get(endpoint)
                if group is None:
                    group = groups[endpoint] = []
                group.append(entry)
        sent = sent_bytes = 0
        for endpoint, entries in groups.items():
            node = self._nodes.get(endpoint)
            try:
                if node is None:
                    node = self._open(endpoint)
                buffers: list[bytes] = []
                for _, header, data in entries:
                    buffers += (header, data, b"\r\n")
                send_buffers(node.sock, buffers)
            except (OSError, BrokerUnavailableError) as exc:
                if isinstance(exc, AuthenticationError):
                    raise
                if node is not None:
                    self._drop(node, exc)
                else:
                    self._problem(endpoint, exc)
                held.extend(entries)
                continue
            node.inflight.extend(entries)
            sent += len(entries)
            sent_bytes += sum(len(e[2]) for e in entries)
        with self._cond:
            self._pending_bytes -= sent_bytes
            self._pending_msgs -= sent
            self._unreplied += sent
            self.published += sent
            self._cond.notify_all()
            more = bool(self._pending)
        retry: list[_Entry] = []
        stalled = False
        if self._unreplied >= REPLY_HIGH_WATER or not more or held:
            for node in list(self._nodes.values()):
                if node.inflight:
                    stalled |= self._read_replies(node, retry)
        if held or retry:
            with self._cond:
                self._pending[:0] = retry + held
                self._pending_bytes += sum(len(e[2]) for e in retry)
                self._pending_msgs += len(retry)
        if held or stalled:
            try:
                slots.refresh()
            except _FATAL:
                raise
            except BrokerUnavailableError as exc:
                self._last_problem = str(exc)
            return True
        if retry:  # MOVED: the map was corrected from the reply; resend at once
            return False
        if self._last_problem is not None and not held:
            logger.warning("publisher reached the Redis Cluster again")
            self._last_problem = None
        return False

    def _open(self, endpoint: Endpoint) -> _Node:
        sock = connect(endpoint)
        sock.settimeout(self.timeout)
        node = self._nodes[endpoint] = _Node(endpoint, sock)
        return node

    def _read_replies(self, node: _Node, retry: list[_Entry]) -> bool:
        """Match replies to ``node.inflight``; return True if a retry must wait."""
        stalled = False
        reader = node.reader
        inflight = node.inflight
        done = 0
        try:
            while inflight:
                reply = reader.gets()
                if reply is False:
                    data = node.sock.recv(RECV_CHUNK)
                    if not data:
                        raise ConnectionResetError(f"{node.endpoint.address} closed the connection")
                    reader.feed(data)
                    continue
                entry = inflight.popleft()
                done += 1
                if type(reply) is int:
                    if not reply:
                        self.unrouted += 1
                    continue
                stalled |= self._refused(node, entry, str(reply), retry)
        except (OSError, hiredis.ProtocolError) as exc:
            self._drop(node, exc)
            stalled = True
        finally:
            with self._cond:
                self._unreplied -= done
                self._cond.notify_all()
        return stalled

    def _refused(self, node: _Node, entry: _Entry, text: str, retry: list[_Entry]) -> bool:
        if text.startswith(_RETRYABLE):
            retry.append(entry)
            self.redirected += 1
            if text.startswith("MOVED "):
                _, slot, address = text.split(" ", 2)
                self.slots.moved(int(slot), address)
                return False
            self._last_problem = f"{node.endpoint.address}: {text.split(' ', 1)[0]}"
            return True
        if text.lower().startswith("err unknown command"):
            raise ShardedPubSubUnsupportedError(
                f"{node.endpoint.address} does not know SPUBLISH (needs Redis 7+ or Valkey)"
            )
        self._publish_refused(entry[0], b"-" + text.encode())
        return False

    def _drop(self, node: _Node, exc: BaseException) -> None:
        """Forget a broken connection; what it owed replies for may be lost."""
        node.sock.close()
        self._nodes.pop(node.endpoint, None)
        self.reconnects += 1
        lost = len(node.inflight)
        node.inflight.clear()
        if lost:
            self.possibly_lost += lost
            with self._cond:
                self._unreplied -= lost
                self._cond.notify_all()
        self._problem(node.endpoint, exc)

    def _problem(self, endpoint: Endpoint, exc: BaseException) -> None:
        problem = str(exc) if isinstance(exc, MsightError) else f"{type(exc).__name__}: {exc}"
        if self._last_problem is None:
            logger.warning(
                "publisher lost Redis Cluster node %s (%s); buffering up to %d bytes and "
                "waiting for the slot map to change",
                endpoint.address,
                problem,
                self.buffer_bytes,
            )
        self._last_problem = problem
