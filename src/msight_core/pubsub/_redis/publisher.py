"""One Redis server, publishing side: ``PUBLISH`` from a buffer drained by one writer thread.

``publish()`` never waits for a round trip: it appends to an outgoing buffer and
a writer thread sends whatever has accumulated as one batch, in order, then
reads the replies in bulk. While Redis is unreachable the buffer holds up to
``PublishConfig.buffer_bytes``. Through a restart, what was buffered waits for
the channels' subscribers to come back (see :class:`Publisher`).
"""

from __future__ import annotations

import logging
import socket
import time
from collections import deque
from typing import Any

from ...errors import AuthenticationError, BrokerUnavailableError, MsightError
from .outbox import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    RECV_CHUNK,
    REPLY_HIGH_WATER,
    RESUBSCRIBE_GRACE,
    Outbox,
)
from .pacing import CHECK_BYTES, POLL, QUERY, Pacer, parse_client_list
from .wire import Endpoint, connect, hiredis, send_buffers

__all__ = ["Publisher"]

logger = logging.getLogger("msight_core.pubsub.redis")

_HOLD_RETRY = 0.02  # seconds between sends of a held message that reached nobody
_INFLIGHT_BYTES = 64 * 1024 * 1024  # read replies before more than this awaits them


class Publisher(Outbox):
    """Outgoing buffer plus the writer thread that owns the publishing socket.

    Redis answers each ``PUBLISH`` with the number of subscribers that got it.
    The writer remembers which channels had subscribers; after a reconnect it
    holds a message for such a channel until Redis reports a subscriber again
    (the subscribers reconnect and subscribe again on their own) or
    ``RESUBSCRIBE_GRACE`` has passed, resending it while it reaches nobody. So
    what was buffered through a restart is not replayed into a channel nobody
    has subscribed to yet. Order is kept: nothing behind a held message is sent.
    """

    def __init__(self, endpoint: Endpoint, buffer_bytes: int, timeout: float) -> None:
        super().__init__(buffer_bytes, timeout)
        self.endpoint = endpoint
        self.where = f"Redis at {endpoint.address}"
        self._writer_waiting = False
        self._sock: socket.socket | None = None
        self._reply_tail = b""
        self._prefixes: dict[str, bytes] = {}
        self._names: list[str] = []  # channel of each pending message
        # Written, reply not read yet: (channel, header, payload). Sent again after
        # a reconnect, since Redis may have died before handling them.
        self._inflight: deque[tuple[str, bytes, bytes]] = deque()
        self._inflight_bytes = 0
        self._had_receivers: set[str] = set()  # last reply for the channel was > 0
        self._unconfirmed: set[str] = set()  # after a reconnect: no receiver seen yet
        self._hold_until = 0.0
        self.held_seconds = 0.0
        self._pacer = Pacer()

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
            self._names.append(name)
            self._accepted(size)
            if self._writer_waiting:
                self._cond.notify_all()

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out["held_for_resubscribe_s"] = round(self.held_seconds, 3)
        out["paced_s"] = round(self._pacer.waited, 3)
        return out

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
                batch, names = self._pending, self._names
                self._pending, self._names = [], []
            held = None
            try:
                if self._sock is None:
                    self._sock = self._connect()
                    self._reply_tail = b""
                    backoff = BACKOFF_MIN
                if self._unconfirmed:
                    batch, names, held = self._split_at_unconfirmed(batch, names)
                if batch:
                    self._send_paced(batch, names)
                    with self._cond:
                        more = bool(self._pending)
                    if (
                        not more
                        or self._unreplied >= REPLY_HIGH_WATER
                        or self._inflight_bytes >= _INFLIGHT_BYTES
                    ):
                        self._read_replies()
                if held is not None:
                    if self._unreplied:
                        self._read_replies()
                    self._send_held(*held)
            except AuthenticationError as exc:
                with self._cond:
                    self._fatal = exc
                    self._requeue(batch, names, held)
                    self._cond.notify_all()
                logger.error("%s; publishing stopped", exc)
                return
            except (OSError, BrokerUnavailableError, hiredis.ProtocolError) as exc:
                with self._cond:
                    self._requeue(batch, names, held)  # not confirmed sent: resend later
                    self._lost_connection(exc)
                    if self._closing and self._abort:
                        break
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send_paced(self, batch: list[bytes], names: list[str]) -> None:
        """Send ``batch`` in pieces of about ``CHECK_BYTES``, looking at the
        subscribers' output buffers between pieces (see :mod:`.pacing`).

        On a failure, what was not sent is left in ``batch``/``names`` (the
        caller puts it back in the buffer)."""
        pacer = self._pacer
        if not pacer.enabled:
            self._send(batch, names)
            return
        sizes = [len(b) for b in batch[1::3]]
        if pacer.unsent_check + sum(sizes) < CHECK_BYTES:
            self._send(batch, names)
            pacer.sent(sum(sizes))
            return
        while names:
            if pacer.due():
                self._pace()
            room, count, nbytes = CHECK_BYTES - pacer.unsent_check, 0, 0
            for size in sizes:
                if count and nbytes + size > room:
                    break
                count += 1
                nbytes += size
            piece, piece_names = batch[: 3 * count], names[:count]
            del batch[: 3 * count], names[:count], sizes[:count]
            try:
                self._send(piece, piece_names)
            except BaseException:
                batch[:0] = piece  # not confirmed sent (or not sent at all)
                names[:0] = piece_names
                raise
            pacer.sent(nbytes)

    def _pace(self) -> None:
        """Wait while a subscriber's output buffer on the server is above the mark."""
        sock = self._sock
        assert sock is not None
        if self._unreplied:
            self._read_replies()
        started = time.monotonic()
        while True:
            sock.sendall(QUERY)
            header = self._read_line(sock)
            if not header.startswith(b"$"):
                self._pacer.refused(header)
                return
            listing = self._read_exact(sock, int(header[1:]) + 2)[:-2]
            now = time.monotonic()
            if not self._pacer.must_wait(parse_client_list(listing), now):
                break
            with self._cond:
                if self._abort:
                    break
            time.sleep(POLL)
        self._pacer.waited += time.monotonic() - started

    def _read_exact(self, sock: socket.socket, n: int) -> bytes:
        data = self._reply_tail
        pieces, have = [data], len(data)
        while have < n:
            chunk = sock.recv(max(RECV_CHUNK, n - have))
            if not chunk:
                raise ConnectionResetError("connection closed by Redis")
            pieces.append(chunk)
            have += len(chunk)
        data = b"".join(pieces)
        self._reply_tail = data[n:]
        return data[:n]

    def _send(self, batch: list[bytes], names: list[str]) -> None:
        assert self._sock is not None
        send_buffers(self._sock, batch)
        count = len(names)
        sent_bytes = sum(len(b) for b in batch[1::3])
        self._inflight.extend(zip(names, batch[0::3], batch[1::3]))
        self._inflight_bytes += sent_bytes
        with self._cond:
            self._pending_msgs -= count
            self._pending_bytes -= sent_bytes
            self._unreplied += count
            self.published += count
            self._cond.notify_all()
        # Sent: a failure from here on must not send these again.
        batch.clear()
        names.clear()

    def _requeue(self, batch: list[bytes], names: list[str], held: Any) -> None:
        # Called with the lock held: what was not sent goes back in front, in order.
        if held is not None:
            triple, name, rest, rest_names = held
            batch = batch + triple + rest
            names = names + [name] + rest_names
        self._pending[:0] = batch
        self._names[:0] = names

    def _split_at_unconfirmed(
        self, batch: list[bytes], names: list[str]
    ) -> tuple[list[bytes], list[str], Any]:
        """Cut the batch before the first message for a channel awaiting its subscribers."""
        if time.monotonic() >= self._hold_until:
            self._unconfirmed.clear()
            return batch, names, None
        unconfirmed = self._unconfirmed
        for i, name in enumerate(names):
            if name in unconfirmed:
                held = (batch[3 * i : 3 * i + 3], name, batch[3 * i + 3 :], names[i + 1 :])
                return batch[: 3 * i], names[:i], held
        return batch, names, None

    def _send_held(
        self, triple: list[bytes], name: str, rest: list[bytes], rest_names: list[str]
    ) -> None:
        """Send one message alone until a subscriber gets it or the grace period ends.

        A reply of 0 means nobody received it, so sending it again duplicates
        nothing. The rest of the batch goes back to the buffer, behind it.
        """
        with self._cond:
            self._pending[:0] = rest
            self._names[:0] = rest_names
        rest.clear()
        rest_names.clear()
        sock = self._sock
        assert sock is not None and not self._unreplied
        started = time.monotonic()
        while True:
            send_buffers(sock, triple)
            reply = self._read_line(sock)
            now = time.monotonic()
            if reply != b":0" or now >= self._hold_until:
                break
            with self._cond:
                if self._abort:
                    break
                self._cond.wait(_HOLD_RETRY)
        self.held_seconds += time.monotonic() - started
        self._unconfirmed.discard(name)
        if reply == b":0":
            self.unrouted += 1
            self._had_receivers.discard(name)
        elif reply.startswith(b"-"):
            self._publish_refused(name, reply)
        with self._cond:
            self._pending_msgs -= 1
            self._pending_bytes -= len(triple[1])
            self.published += 1
            self._cond.notify_all()
        triple.clear()

    def _read_line(self, sock: socket.socket) -> bytes:
        """One reply line, when nothing else is outstanding (the held message's)."""
        data = self._reply_tail
        while b"\r\n" not in data:
            chunk = sock.recv(RECV_CHUNK)
            if not chunk:
                raise ConnectionResetError("connection closed by Redis")
            data += chunk
        line, _, self._reply_tail = data.partition(b"\r\n")
        return line

    def _connect(self) -> socket.socket:
        sock = connect(self.endpoint)
        sock.settimeout(self.timeout)
        if self._last_problem is not None:
            logger.warning("publisher reconnected to Redis at %s", self.endpoint.address)
            self._last_problem = None
        if self._had_receivers:
            # The subscribers of these channels are reconnecting too: hold each
            # channel's next message until one of them is back (bounded).
            self._unconfirmed = set(self._had_receivers)
            self._hold_until = time.monotonic() + RESUBSCRIBE_GRACE
        return sock

    def _lost_connection(self, exc: BaseException) -> None:
        # Called with the lock held. Log once per outage, not per message.
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.reconnects += 1
        if self._inflight:
            # No reply: Redis may or may not have handled them. Not sent again, so a
            # subscriber never sees a message twice (best-effort); counted instead.
            self.possibly_lost += len(self._inflight)
            self._inflight.clear()
            self._inflight_bytes = 0
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

        Every PUBLISH reply is one line (``:N`` receivers, or ``-ERR ...``). A
        chunk of replies without ``:0`` or an error means every channel in it had
        subscribers; only other chunks are matched line by line.
        """
        sock = self._sock
        assert sock is not None
        tail = self._reply_tail
        inflight = self._inflight
        had = self._had_receivers
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
            done = [inflight.popleft() for _ in range(min(replies, len(inflight)))]
            self._inflight_bytes -= sum(len(entry[2]) for entry in done)
            names = [entry[0] for entry in done]
            unrouted = complete.count(b":0\r\n")
            with self._cond:
                self._unreplied -= replies
                self.unrouted += unrouted
                if self._unreplied <= 0:
                    self._unreplied = 0
                    self._cond.notify_all()
            if not unrouted and b"-" not in complete:
                had.update(names)
                continue
            for name, line in zip(names, complete.split(b"\r\n")):
                if line == b":0":
                    had.discard(name)
                elif line.startswith(b"-"):
                    self._publish_refused(name, line)
                else:
                    had.add(name)
        self._reply_tail = tail


def _shutdown_socket(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
