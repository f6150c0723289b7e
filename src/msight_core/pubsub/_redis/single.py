"""One Redis server: the ``Publisher`` and ``Subscriber`` of ``PUBLISH``/``SUBSCRIBE``.

Redis pub/sub has no flow control: a subscriber with 32 MB queued on the server
(or 8 MB for 60 s) is disconnected and its backlog is lost. So the
:class:`Subscriber`'s reader thread drains the socket continuously, parses
replies in bulk with hiredis and hands messages to the bounded receive queue;
the application's pace only decides what that queue keeps.

:class:`Publisher` never waits for a round trip: ``publish()`` appends to an
outgoing buffer and a writer thread sends whatever has accumulated as one
batch, in order, then reads the replies in bulk. While Redis is unreachable the
buffer holds up to ``PublishConfig.buffer_bytes``.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from typing import Any

from ...errors import AuthenticationError, BrokerUnavailableError, MsightError
from .._core import Delivery, ReceiveQueue
from .outbox import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    CLOSE_TIMEOUT,
    RECV_CHUNK,
    REPLY_HIGH_WATER,
    Outbox,
)
from .wire import Endpoint, ReplyStream, connect, hiredis, pack_command, send_buffers

__all__ = ["Publisher", "Subscriber"]

logger = logging.getLogger("msight_core.pubsub.redis")


class Publisher(Outbox):
    """Outgoing buffer plus the writer thread that owns the publishing socket."""

    def __init__(self, endpoint: Endpoint, buffer_bytes: int, timeout: float) -> None:
        super().__init__(buffer_bytes, timeout)
        self.endpoint = endpoint
        self.where = f"Redis at {endpoint.address}"
        self._writer_waiting = False
        self._sock: socket.socket | None = None
        self._reply_tail = b""
        self._prefixes: dict[str, bytes] = {}

    def publish(self, name: str, data: bytes) -> None:
        """Queue one message for channel ``name``; blocks only while the buffer is full.

        Raises:
            BackpressureError: no room in the buffer within the publish timeout.
            AuthenticationError: publishing stopped (credentials refused).
        """
        prefix = self._prefixes.get(name)
        if prefix is None:
            raw = name.encode()
            prefix = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n" % (len(raw), raw)
            if len(self._prefixes) < 10_000:
                self._prefixes[name] = prefix
        size = len(data)
        with self._cond:
            self._admit(size)
            self._pending.append(b"%s$%d\r\n" % (prefix, size))
            self._pending.append(data)
            self._pending.append(b"\r\n")
            self._accepted(size)
            if self._writer_waiting:
                self._cond.notify_all()

    def _interrupt(self) -> None:
        sock = self._sock
        if sock is not None:
            _shutdown_socket(sock)

    # -- writer thread ------------------------------------------------------------

    def _run(self) -> None:
        backoff = BACKOFF_MIN
        while True:
            with self._cond:
                while not self._pending and not self._unreplied and not self._closing:
                    self._writer_waiting = True
                    self._cond.notify_all()  # flush() waiters: settled
                    self._cond.wait()
                self._writer_waiting = False
                if self._abort or (self._closing and not self._pending and not self._unreplied):
                    break
                batch, count = self._pending, self._pending_msgs
                self._pending = []
            try:
                if self._sock is None:
                    self._sock = self._connect()
                    self._reply_tail = b""
                    backoff = BACKOFF_MIN
                if batch:
                    send_buffers(self._sock, batch)
                sent_bytes = sum(len(b) for b in batch[1::3])
                with self._cond:
                    self._pending_msgs -= count
                    self._pending_bytes -= sent_bytes
                    self._unreplied += count
                    self.published += count
                    self._cond.notify_all()
                    more = bool(self._pending)
                if self._unreplied >= REPLY_HIGH_WATER or not more:
                    self._read_replies()
            except AuthenticationError as exc:
                with self._cond:
                    self._fatal = exc
                    self._pending[:0] = batch
                    self._cond.notify_all()
                logger.error("%s; publishing stopped", exc)
                return
            except (OSError, BrokerUnavailableError, hiredis.ProtocolError) as exc:
                with self._cond:
                    self._pending[:0] = batch  # not confirmed sent: keep, resend later
                    self._lost_connection(exc)
                    if self._closing and self._abort:
                        break
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self) -> socket.socket:
        sock = connect(self.endpoint)
        sock.settimeout(self.timeout)
        if self._last_problem is not None:
            logger.warning("publisher reconnected to Redis at %s", self.endpoint.address)
            self._last_problem = None
        return sock

    def _lost_connection(self, exc: BaseException) -> None:
        # Called with the lock held. Log once per outage, not per message.
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.reconnects += 1
        if self._unreplied:
            self.possibly_lost += self._unreplied
            self._unreplied = 0
        problem = str(exc) if isinstance(exc, MsightError) else f"{type(exc).__name__}: {exc}"
        if self._last_problem is None:
            logger.warning(
                "publisher lost Redis at %s (%s); buffering up to %d bytes and retrying",
                self.endpoint.address,
                problem,
                self.buffer_bytes,
            )
        self._last_problem = problem

    def _read_replies(self) -> None:
        """Consume the replies to everything sent so far.

        Every PUBLISH reply is one line (``:N`` receivers, or ``-ERR ...``), so
        counting line ends is enough; no per-reply parsing on the hot path.
        """
        sock = self._sock
        assert sock is not None
        tail = self._reply_tail
        while self._unreplied:
            data = sock.recv(RECV_CHUNK)
            if not data:
                raise ConnectionResetError("connection closed by Redis")
            data = tail + data if tail else data
            end = data.rfind(b"\r\n") + 2
            if end < 2:
                tail = data
                continue
            complete, tail = data[:end], data[end:]
            replies = complete.count(b"\r\n")
            with self._cond:
                self._unreplied -= replies
                self.unrouted += complete.count(b":0\r\n")
                if self._unreplied <= 0:
                    self._unreplied = 0
                    self._cond.notify_all()
            if b"-" in complete:
                for line in complete.split(b"\r\n"):
                    if line.startswith(b"-"):
                        self.failed += 1
                        logger.error(
                            "Redis refused a PUBLISH: %s", line[1:].split(b" ", 1)[0].decode()
                        )
        self._reply_tail = tail


class Subscriber:
    """The subscribing socket and the reader thread that drains it."""

    def __init__(self, endpoint: Endpoint, queue: ReceiveQueue) -> None:
        self.endpoint = endpoint
        self.queue = queue
        self._lock = threading.Lock()
        self._names: list[str] = []
        self._outbox: list[bytes] = []
        self._confirmed: dict[str, threading.Event] = {}
        self._sock: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.reconnects = 0
        self.outage_seconds = 0.0

    def subscribe(self, name: str) -> None:
        event = threading.Event()
        with self._lock:
            self._names.append(name)
            self._confirmed[name] = event
            self._outbox.append(pack_command(b"SUBSCRIBE", name.encode()))
            start = self._thread is None
        if start:
            try:
                self._sock = connect(self.endpoint)
            except BaseException:
                with self._lock:
                    self._names.remove(name)
                    self._outbox.clear()
                raise
            self._thread = threading.Thread(
                target=self._run, name="msight-redis-reader", daemon=True
            )
            self._thread.start()
        else:
            self._wake()
        if not event.wait(self.endpoint.connect_timeout):
            with self._lock:
                if name in self._names:
                    self._names.remove(name)
            raise BrokerUnavailableError(
                f"Redis at {self.endpoint.address} did not confirm SUBSCRIBE {name} "
                f"within {self.endpoint.connect_timeout:g}s"
            )

    def close(self) -> None:
        self._closed = True
        self._wake()
        if self._thread is not None:
            self._thread.join(CLOSE_TIMEOUT)
        if self._sock is not None:
            self._sock.close()
        self._wake_r.close()
        self._wake_w.close()

    def stats(self) -> dict[str, Any]:
        """Counters for ``RedisPubSub.stats()``."""
        return {
            "subscriber_reconnects": self.reconnects,
            "outage_seconds": round(self.outage_seconds, 3),
        }

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _run(self) -> None:
        lost_at: float | None = None
        backoff = BACKOFF_MIN
        while not self._closed:
            try:
                if self._sock is None:
                    self._sock = connect(self.endpoint)
                    with self._lock:
                        self._outbox = [pack_command(b"SUBSCRIBE", n.encode()) for n in self._names]
                    if lost_at is not None:
                        outage = time.monotonic() - lost_at
                        self.outage_seconds += outage
                        logger.warning(
                            "subscriber reconnected to Redis at %s after %.2fs; resubscribed to %s",
                            self.endpoint.address,
                            outage,
                            ", ".join(self._names),
                        )
                        lost_at = None
                    backoff = BACKOFF_MIN
                self._drain(self._sock)
            except AuthenticationError as exc:
                logger.error("%s; subscriber stopped", exc)
                self.queue.fail(exc)
                return
            except (OSError, hiredis.ProtocolError, BrokerUnavailableError) as exc:
                if self._closed:
                    break
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None
                if lost_at is None:
                    lost_at = time.monotonic()
                    self.reconnects += 1
                    logger.warning(
                        "subscriber lost Redis at %s (%s) on topics %s; reconnecting. "
                        "Messages published meanwhile are lost (Redis pub/sub is best-effort)",
                        self.endpoint.address,
                        exc if isinstance(exc, MsightError) else type(exc).__name__,
                        ", ".join(self._names),
                    )
                time.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    def _drain(self, sock: socket.socket) -> None:
        """Read until the connection fails or the subscriber closes."""
        stream = ReplyStream(sock)
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        is_tls = hasattr(sock, "pending")
        names: dict[bytes, str] = {}
        put_many = self.queue.put_many
        while not self._closed:
            if self._outbox:
                with self._lock:
                    outbox, self._outbox = self._outbox, []
                sock.sendall(b"".join(outbox))
            if not (is_tls and sock.pending()):  # type: ignore[attr-defined]
                events = poller.poll()
                if any(fd == self._wake_r.fileno() for fd, _ in events):
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                    if not any(fd == sock.fileno() for fd, _ in events):
                        continue
            batch: list[Delivery] = []
            for reply in stream.read():
                if type(reply) is list and len(reply) == 3:
                    kind = reply[0]
                    if kind == b"message":
                        channel = reply[1]
                        name = names.get(channel)
                        if name is None:
                            name = names[channel] = channel.decode()
                        batch.append(Delivery(name, reply[2]))
                        continue
                    if kind == b"subscribe":
                        event = self._confirmed.get(reply[1].decode())
                        if event is not None:
                            event.set()
                        continue
                if isinstance(reply, hiredis.ReplyError):
                    logger.error("Redis refused a subscription: %s", reply)
            if batch:
                put_many(batch)


def _shutdown_socket(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
