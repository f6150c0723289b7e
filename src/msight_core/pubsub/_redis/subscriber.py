"""One Redis server, subscribing side: ``SUBSCRIBE`` on a socket drained by its own thread.

Redis pub/sub has no flow control: a subscriber with 32 MB queued on the server
(or 8 MB for 60 s) is disconnected and its backlog is lost. So the reader
thread drains the socket continuously (small replies parsed in bulk by hiredis,
large frames received directly, see ``reader``) and hands messages to the
bounded receive queue; the application's pace only decides what that queue keeps.
"""

from __future__ import annotations

import logging
import re
import select
import socket
import threading
import time
from collections import deque
from typing import Any

from ...errors import (
    AuthenticationError,
    BrokerUnavailableError,
    MsightError,
    PermissionDeniedError,
)
from ...topics import topic_matcher
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
        # What is subscribed, in order: a channel name, or a PSUBSCRIBE glob for
        # a pattern -> the command that (re)subscribes it.
        self._wanted: dict[str, bytes] = {}
        # glob -> exact matchers of the patterns behind it (a Redis glob's * also
        # matches dots; msight patterns match whole tokens, as NATS does).
        self._matchers: dict[bytes, list[re.Pattern[str]]] = {}
        self._outbox: list[bytes] = []
        self._confirmed: dict[str, threading.Event] = {}
        # SUBSCRIBEs sent and not yet answered, in order: an error reply is the
        # answer to the first of them (Redis answers commands in order).
        self._awaiting: deque[str] = deque()
        self._refused: dict[str, str] = {}
        self.unexpected = 0
        self._sock: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.reconnects = 0
        self.outage_seconds = 0.0

    def subscribe(self, name: str) -> None:
        """Subscribe to channel ``name``; blocks until Redis confirms.

        Raises:
            PermissionDeniedError: Redis's ACL refuses the channel.
            BrokerUnavailableError: no confirmation within the connect timeout.
        """
        self._request(name, pack_command(b"SUBSCRIBE", name.encode()), f"SUBSCRIBE {name}")

    def subscribe_pattern(self, pattern: str) -> None:
        """Subscribe to every channel ``pattern`` matches (``*`` one token, ``>`` the rest).

        Redis globs are wider than msight patterns (``*`` crosses dots), so each
        message is checked against the exact pattern before it is queued.
        """
        glob = ".".join("*" if t in ("*", ">") else t for t in pattern.split("."))
        with self._lock:
            self._matchers.setdefault(glob.encode(), []).append(topic_matcher(pattern))
        try:
            self._request(glob, pack_command(b"PSUBSCRIBE", glob.encode()), f"PSUBSCRIBE {glob}")
        except BaseException:
            with self._lock:
                matchers = self._matchers.get(glob.encode(), [])
                if matchers:
                    matchers.pop()
                if not matchers:
                    self._matchers.pop(glob.encode(), None)
            raise

    def _request(self, key: str, command: bytes, what: str) -> None:
        event = threading.Event()
        with self._lock:
            if key in self._wanted:  # a second pattern with the same glob
                return
            self._wanted[key] = command
            self._confirmed[key] = event
            self._outbox.append(command)
            self._awaiting.append(key)
            start = self._thread is None
        if start:
            try:
                self._sock = connect(self.endpoint)
            except BaseException:
                with self._lock:
                    self._wanted.pop(key, None)
                    self._outbox.clear()
                    self._awaiting.clear()
                raise
            self._thread = threading.Thread(
                target=self._run, name="msight-redis-reader", daemon=True
            )
            self._thread.start()
        else:
            self._wake()
        confirmed = event.wait(self.endpoint.connect_timeout)
        with self._lock:
            refused = self._refused.pop(key, None)
            if refused is not None or not confirmed:
                self._wanted.pop(key, None)
        if refused is not None:
            raise PermissionDeniedError(
                f"Redis at {self.endpoint.address} refused {what}: {refused}"
            )
        if not confirmed:
            raise BrokerUnavailableError(
                f"Redis at {self.endpoint.address} did not confirm {what} "
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
            "unexpected_messages": self.unexpected,
        }

    def _known(self, channel: bytes) -> str | None:
        """The topic of ``channel`` if we subscribed to it; else count and drop."""
        name = channel.decode("utf-8", "replace")
        if name in self._confirmed:
            return name
        self.unexpected += 1
        logger.warning("dropped a message on channel %r, which was not subscribed", name[:80])
        return None

    def _pattern_message(self, glob: bytes, channel: bytes, data: bytes) -> Delivery | None:
        matchers = self._matchers.get(glob)
        name = channel.decode("utf-8", "replace")
        if matchers is None:
            self.unexpected += 1
            return None
        if any(m.fullmatch(name) for m in matchers):
            return Delivery(name, data)
        return None  # matched the wider Redis glob only

    def _answered(self, channel: bytes | None, error: str | None) -> None:
        """A SUBSCRIBE was confirmed (``channel``) or refused (``error``)."""
        with self._lock:
            if channel is not None:
                name = channel.decode("utf-8", "replace")
                if name in self._awaiting:
                    self._awaiting.remove(name)
            elif self._awaiting:
                name = self._awaiting.popleft()
                # What Redis says of it; never a credential.
                self._refused[name] = error[:200] if error else "refused"
                self._wanted.pop(name, None)
            else:
                logger.error("Redis sent an error to the subscriber: %s", (error or "")[:200])
                return
            event = self._confirmed.get(name)
        if error is not None:
            logger.error("Redis refused SUBSCRIBE %s: %s", name, error[:200])
        if event is not None:
            event.set()

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
                        self._outbox = list(self._wanted.values())
                        self._awaiting = deque(self._wanted)
                    if lost_at is not None:
                        outage = time.monotonic() - lost_at
                        self.outage_seconds += outage
                        logger.warning(
                            "subscriber reconnected to Redis at %s after %.2fs; resubscribed to %s",
                            self.endpoint.address,
                            outage,
                            ", ".join(self._wanted),
                        )
                        lost_at = None
                    backoff = BACKOFF_MIN
                self._drain(self._sock)
            except AuthenticationError as exc:
                logger.error("%s; subscriber stopped", exc)
                self.queue.fail(exc)
                return
            except Exception as exc:  # the reader must outlive any reply
                if self._closed:
                    break
                if not isinstance(exc, (OSError, hiredis.ProtocolError, BrokerUnavailableError)):
                    # Not a connection problem: a reply we cannot handle. Reconnect
                    # rather than stop: listen() must never hang on a dead reader.
                    logger.exception("Redis subscriber could not handle a reply")
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
                        ", ".join(self._wanted),
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
                if type(reply) is list and len(reply) == 4 and reply[0] == b"pmessage":
                    delivery = self._pattern_message(reply[1], reply[2], reply[3])
                    if delivery is not None:
                        batch.append(delivery)
                    continue
                if type(reply) is list and len(reply) == 3:
                    kind = reply[0]
                    if kind == b"message":
                        channel = reply[1]
                        name = names.get(channel)
                        if name is None:
                            name = self._known(channel)
                            if name is None:
                                continue
                            names[channel] = name
                        batch.append(Delivery(name, reply[2]))
                        continue
                    if kind == b"subscribe" or kind == b"psubscribe":
                        self._answered(reply[1], None)
                        continue
                if isinstance(reply, hiredis.ReplyError):
                    self._answered(None, str(reply))
            if batch:
                put_many(batch)
