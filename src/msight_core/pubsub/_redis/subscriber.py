"""One Redis server, subscribing side: ``SUBSCRIBE`` on a socket drained by its own thread.

Redis pub/sub has no flow control: a subscriber with 32 MB queued on the server
(or 8 MB for 60 s) is disconnected and its backlog is lost. So the reader
thread drains the socket continuously (small replies parsed in bulk by hiredis,
large frames received directly, see ``reader``) and hands messages to the
bounded receive queue; the application's pace only decides what that queue keeps.
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
from .outbox import BACKOFF_MAX, BACKOFF_MIN, CLOSE_TIMEOUT
from .reader import ReplyStream
from .wire import Endpoint, connect, hiredis, pack_command

__all__ = ["Subscriber"]

logger = logging.getLogger("msight_core.pubsub.redis")


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
