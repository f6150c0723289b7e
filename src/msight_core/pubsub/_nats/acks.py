"""JetStream acknowledgements and core-NATS receipts of the NATS publisher (not public API).

:class:`Receipts` is the part of :class:`~.publisher.Publisher` that learns
what reached the server: tracked messages (JetStream publishes and large-frame
chunks) wait in ``_sent`` for the stream's ack on the publisher's private inbox
and are sent again when it is late, after a reconnect, or while JetStream is
briefly unavailable (503); in core NATS a PING after new traffic tells a
disconnect how many messages may be lost. A mixin of the publisher (it works
on the publisher's own state), kept apart to keep each module small.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from ...errors import MsightError, PermissionDeniedError, PublishError
from . import internals
from .chunks import CHUNK_PREFIX, FETCH_PREFIX
from .commands import Commands, Tracked
from .frames import LargeFrames

__all__ = ["Receipts"]

logger = logging.getLogger("msight_core.pubsub.nats")

_ACK_CHECK_INTERVAL = 1.0
_CONFIRM_INTERVAL = 0.05  # core NATS: PING this often while messages flow
_RETRY_DELAY = 0.25  # JetStream briefly unavailable (503): send again after this


class Receipts:
    """Ack tracking and receipts; mixed into :class:`~.publisher.Publisher`."""

    jetstream: bool
    timeout: float
    resend_after: float
    published: int
    confirmed: int
    possibly_lost: int
    acked: int
    resent: int
    failed: int
    retried: int
    _cond: threading.Condition
    _loop: asyncio.AbstractEventLoop | None
    _nc: Any
    _buf: list[Any]
    _buf_plain: bool
    _buf_msgs: int
    _buf_bytes: int
    _sent: dict[int, Tracked]
    _sent_bytes: int
    _room_waiters: int
    _changed: asyncio.Event | None
    _error: MsightError | None
    _commands: Commands
    _ack_sub: Any
    _retry_ids: list[int]
    _large: LargeFrames
    _prefixes: dict[str, bytes]
    refusals = 0  # publishes the server's permissions refused
    _refused_control = 0  # frame requests and confirmations the server refused
    # The publisher's own: wake() (run the writer) and _signal() (room was made).

    def requeue_unacked(self, older_than: float | None = None) -> int:
        """On the loop: put sent-but-unacknowledged messages back at the front."""
        now = time.monotonic()
        with self._cond:
            late = [
                t for t in self._sent.values() if older_than is None or now - t.sent_at > older_than
            ]
            self._requeue(late)
            self.resent += len(late)
        if late:
            self.wake()
        return len(late)

    def _requeue(self, items: list[Tracked]) -> None:
        # Called with the lock held: ``items`` leave ``_sent`` for the buffer's front.
        if not items:
            return
        items.sort(key=lambda t: t.id)
        for item in items:
            del self._sent[item.id]
            self._sent_bytes -= item.size
        self._buf[:0] = items
        self._buf_plain = False
        self._buf_msgs += len(items)
        self._buf_bytes += sum(t.size for t in items)

    def _retry_later(self, item: Tracked) -> None:
        """On the loop, lock held: send ``item`` again shortly (it stays unacked)."""
        item.sent_at = time.monotonic()  # not "late" for requeue_unacked meanwhile
        self.retried += 1
        if not self._retry_ids:
            self._loop.call_later(_RETRY_DELAY, self._retry_due)  # type: ignore[union-attr]
        self._retry_ids.append(item.id)

    def _retry_due(self) -> None:
        with self._cond:
            ids, self._retry_ids = self._retry_ids, []
            self._requeue([self._sent[i] for i in dict.fromkeys(ids) if i in self._sent])
        self.wake()

    async def _subscribe_acks(self, nc: Any) -> None:
        self._ack_sub = await nc.subscribe(
            self._commands.ack_prefix + "*",
            cb=self._on_ack,
            pending_msgs_limit=1_000_000,
            pending_bytes_limit=256 * 1024 * 1024,
        )

    async def _on_ack(self, msg: Any) -> None:
        ident = self._commands.ack_id(msg.subject)
        if ident is None:
            return
        data = msg.data
        headers = msg.headers
        # 503: no stream answered (a replicated stream electing a leader, a server
        # still recovering its streams, or no stream at all). Sent again until the
        # publish timeout has passed since the first send; then it is an error.
        unavailable = (headers is not None and headers.get("Status") == "503") or (
            b'"code":503' in data
        )
        failed = unavailable or b'"error"' in data
        with self._cond:
            item = self._sent.get(ident)
            if item is None:
                return  # a duplicate ack after a resend
            if unavailable and time.monotonic() - item.first_sent < self.timeout:
                self._retry_later(item)
                return
            del self._sent[ident]
            self._sent_bytes -= item.size
            if self._room_waiters or self._changed is not None:
                self._signal()
            if not failed:
                self.acked += 1
            else:
                self.failed += 1
                why = "no stream answered" if not data else data.decode(errors="replace")[:200]
                if unavailable:
                    why += f" for {self.timeout:g}s"
                self._error = PublishError(
                    f"NATS JetStream did not store a message for {item.what!r}: {why}"
                )
            if not self._sent:
                self._signal()
        if failed:
            logger.error(
                "NATS JetStream refused a message on %r (%d refused so far)", item.what, self.failed
            )

    async def _confirm(self) -> None:
        """Core NATS: a PING after new traffic, so a disconnect knows what is at risk.

        The server handles one connection's commands in order: once the PONG is
        back, every message handed over before the PING reached the server.
        """
        while True:
            await asyncio.sleep(_CONFIRM_INTERVAL)
            nc = self._nc
            handed = self.published
            if nc is None or not nc.is_connected or handed <= self.confirmed:
                continue
            try:
                await internals.confirm(nc, max(self.timeout, 1.0))
            except Exception as exc:  # noqa: BLE001 - a disconnect is counted by lost_connection()
                logger.debug("confirming PING failed: %s", type(exc).__name__)
                continue
            self.confirmed = max(self.confirmed, handed)

    def refused(self, text: str) -> None:
        """The server refused a command (on the loop). A refused publish is raised
        by the next ``publish()`` or ``flush()`` as a ``PublishError`` caused by a
        ``PermissionDeniedError``; a refused subscription by ``subscribe()``."""
        if "for publish to" not in text.lower():
            return
        quoted = text.split('"')
        subject = quoted[1] if len(quoted) > 2 else "?"
        if subject.startswith(FETCH_PREFIX):  # a frame request or confirmation, not a message
            self._refused_control += 1
            if self._refused_control == 1:
                logger.warning(
                    "NATS refused a large-frame request or confirmation to %r: allow the "
                    "user to publish to %s> (see docs/guides/security.md); without it "
                    "queue-group members get no large frames and publishers of large "
                    "frames cannot pace on this subscriber",
                    subject,
                    FETCH_PREFIX,
                )
            return
        # nats-py lowercases the server's text: find the topic as it was written.
        base = subject.removeprefix(CHUNK_PREFIX)
        topic = next((t for t in list(self._prefixes) if t.lower() == base), base)
        what = f"the large-frame chunks of {topic!r}" if base != subject else repr(topic)
        self.refusals += 1
        if self.refusals == 1 or self.refusals % 1000 == 0:
            logger.error(
                "NATS refused to publish to %s: the user's permissions do not allow it "
                "(%d refused so far)",
                what,
                self.refusals,
            )
        with self._cond:
            if self._error is None:
                error = PublishError(f"NATS refused a message to {what} (permissions)")
                error.__cause__ = PermissionDeniedError(
                    f"the NATS user may not publish to {subject!r}"
                )
                self._error = error

    def raise_error(self) -> None:
        """Raise what failed since the last ``publish()``/``flush()`` (any thread).

        Raises:
            PublishError: a message was refused or not stored.
        """
        with self._cond:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def lost_connection(self) -> int:
        """On the loop, at a disconnect: count messages the server may not have got.

        Core NATS only; in JetStream mode what is not acknowledged is resent.
        """
        if self.jetstream:
            return 0
        at_risk = max(self.published - self.confirmed, 0)
        self.confirmed = self.published
        self.possibly_lost += at_risk
        return at_risk

    def reconnected(self) -> int:
        """On the loop, at a reconnect: resend what awaits an ack, send the buffer.

        Returns:
            Core NATS: the buffered messages sent now. Subscribers on other
            connections may not have resubscribed yet, so these are at risk too
            (core NATS keeps nothing for absent subscribers).
        """
        self._large.reset()  # the server may have lost the (in-memory) chunk stream
        backlog = 0
        if not self.jetstream:
            with self._cond:
                backlog = self._buf_msgs
            self.possibly_lost += backlog
        self.requeue_unacked()
        self.wake()
        return backlog

    async def _check_acks(self) -> None:
        while True:
            await asyncio.sleep(_ACK_CHECK_INTERVAL)
            nc = self._nc
            if nc is None or not nc.is_connected or not self._sent:
                continue
            count = self.requeue_unacked(self.resend_after)
            if count:
                logger.warning(
                    "no JetStream ack after %.1fs: resending %d message(s)",
                    self.resend_after,
                    count,
                )
