"""Flow control of large frames over core NATS, paced by their subscribers (not public API).

nats-server holds what it has not yet written to a subscriber up to
``max_pending`` (64 MB by default) and then disconnects it, losing all of it.
A flat-out publisher of large frames must therefore not get further ahead of
its slowest subscriber than that, and only the subscriber knows how far it is:
a PING round trip tells how far the *server* has read.

So a broadcast subscriber *confirms* each frame whose chunks it has read whole,
and a queue-group member each frame it asked for and got (:func:`confirmation`:
its own random id and the frame's sequence number, a small message to the
publisher's request subject, ``FETCH_PREFIX`` + token, with no reply subject: a
publisher of the previous version ignores it). A member gets a share of the
frames, but confirming the newest it got tells how far behind the publisher it
is all the same, and keeps the frames it has yet to ask for in the publisher's
store (:class:`.chunks.Retained`). The
publisher (:class:`Flow`) counts, per topic, the bytes of the frames it sent
and, per confirming subscriber and topic, the bytes confirmed; before the next
frame of a topic it waits until every *active* subscriber of that topic is
less than :data:`WINDOW` behind (a frame larger than that goes once the
subscriber has everything). On an idle machine confirmations come back within
a millisecond and nothing waits.

**Peers are untrusted**: anyone who can publish to the request subject can
send confirmations. A confirmation is a small checked text; it counts only
for a frame this publisher sent recently (:data:`MAX_MARKS`), and only if it
advances its sender; at most :data:`MAX_PEERS` senders are tracked. No
subscriber can hold the publisher for long:

* it is waited for only while it confirms: one silent for :data:`QUIET`
  seconds (gone, killed, or of a version that does not confirm) is not waited
  for until it confirms again;
* each is given a budget of waiting (:data:`BUDGET` seconds, refilled at
  :data:`REFILL` seconds per second); one that uses it up, because it cannot
  keep up or confirms slowly on purpose, is set aside for :data:`ASIDE`
  seconds (logged): the publisher goes on at the server's pace, as without
  confirmations, and nats-server treats that subscriber as it treats any slow
  consumer. A hostile peer can so cost a publisher a quarter of its time, at
  most, after its first second.

Used on the event loop only.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict

__all__ = ["WINDOW", "Flow", "confirmation", "parse_confirmation"]

logger = logging.getLogger("msight_core.pubsub.nats")

WINDOW = 32 * 1024 * 1024  # bytes of one topic's frames a subscriber may have outstanding
QUIET = 0.25  # a subscriber that confirmed nothing for this long is not waited for
BUDGET = 1.0  # seconds of waiting one subscriber may cause before it is set aside ...
REFILL = 0.25  # ... refilled at this many seconds per second
ASIDE = 10.0  # seconds a subscriber that used up its budget is not waited for
MAX_PEERS = 256  # (subscriber, topic) pairs tracked by one publisher
MAX_MARKS = 4096  # recent frames a confirmation may name
_CONFIRMATION = re.compile(rb"\+([0-9a-f]{16}) ([0-9]{1,19})")


def confirmation(peer: bytes, seq: int) -> bytes:
    """The payload of subscriber ``peer``'s confirmation of frame ``seq``."""
    return b"+%s %d" % (peer.hex().encode(), seq)


def parse_confirmation(data: bytes) -> tuple[bytes, int] | None:
    """``(subscriber id, frame sequence number)`` of a confirmation, ``None`` if
    ``data`` is not one."""
    match = _CONFIRMATION.fullmatch(data)
    if match is None:
        return None
    return bytes.fromhex(match.group(1).decode()), int(match.group(2))


class _Peer:
    """One confirming subscriber on one topic."""

    __slots__ = ("aside", "at", "budget", "confirmed", "refilled", "seq")

    def __init__(self, now: float) -> None:
        self.confirmed = 0  # bytes of the topic's frames confirmed (the publisher's count)
        self.seq = 0  # the newest frame confirmed
        self.at = now  # when it last advanced
        self.budget = BUDGET
        self.refilled = now
        self.aside = 0.0  # not waited for until then

    def active(self, now: float) -> bool:
        return now - self.at < QUIET and now >= self.aside

    def refill(self, now: float) -> None:
        self.budget = min(BUDGET, self.budget + (now - self.refilled) * REFILL)
        self.refilled = now


class Flow:
    """What a publisher's large frames have outstanding at the subscribers that
    confirm them (see the module docstring)."""

    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self._sent: dict[str, int] = {}  # topic -> bytes of its frames sent
        self._marks: OrderedDict[int, tuple[str, int]] = OrderedDict()  # seq -> (topic, sent)
        self._peers: dict[str, dict[bytes, _Peer]] = {}  # topic -> subscriber -> state
        self._count = 0  # pairs in _peers
        self._changed: asyncio.Event | None = None
        self.waits = 0  # frames that waited for a subscriber
        self.waited = 0.0  # seconds waited in all
        self.set_aside = 0  # subscribers set aside after using up their budget
        self.ignored = 0  # confirmations that counted for nothing

    def sent(self, seq: int, topic: str, size: int) -> None:
        """Frame ``seq`` of ``size`` bytes went out on ``topic`` (in chunks, or
        kept for those who ask)."""
        total = self._sent[topic] = self._sent.get(topic, 0) + size
        self._marks[seq] = (topic, total)
        if len(self._marks) > MAX_MARKS:
            self._marks.popitem(last=False)

    def confirm(self, peer: bytes, seq: int) -> None:
        """Subscriber ``peer`` has read frame ``seq`` whole (peer input)."""
        mark = self._marks.get(seq)
        if mark is None:
            self.ignored += 1
            return
        topic, total = mark
        now = time.monotonic()
        peers = self._peers.setdefault(topic, {})
        state = peers.get(peer)
        if state is None:
            if self._count >= MAX_PEERS and not self._evict(now):
                self.ignored += 1
                return
            state = peers[peer] = _Peer(now)
            self._count += 1
        elif seq <= state.seq:
            self.ignored += 1  # a replay, or out of order: no advance
            return
        state.seq, state.confirmed, state.at = seq, total, now
        if self._changed is not None:
            self._changed.set()

    def _evict(self, now: float) -> bool:
        """Forget one pair that has been silent long; ``False`` if none has."""
        for topic, peers in self._peers.items():
            for peer, state in peers.items():
                if now - state.at > max(QUIET, ASIDE) and now >= state.aside:
                    del peers[peer]
                    self._count -= 1
                    if not peers:
                        del self._peers[topic]
                    return True
        return False

    def paced(self, topic: str) -> bool:
        """Whether every subscriber that confirmed ``topic``'s frames lately is
        being waited for: then they pace the publisher, not the server's
        round trips (:mod:`.emit`)."""
        peers = self._peers.get(topic)
        if not peers:
            return False
        now = time.monotonic()
        return all(state.active(now) for state in peers.values() if now - state.at < ASIDE)

    def _blocking(self, topic: str, size: int, now: float) -> list[_Peer]:
        sent = self._sent.get(topic, 0)
        return [
            state
            for state in self._peers.get(topic, {}).values()
            if state.active(now)
            and sent > state.confirmed
            and sent - state.confirmed + size > self.window
        ]

    async def room(self, topic: str, size: int) -> None:
        """Wait until the next ``size``-byte frame of ``topic`` fits every active
        subscriber's window, within the bounds of the module docstring."""
        now = time.monotonic()
        blocking = self._blocking(topic, size, now)
        if not blocking:
            return
        self.waits += 1
        started = now
        if self._changed is None:
            self._changed = asyncio.Event()
        while blocking:
            for state in blocking:
                state.refill(now)
            until = min(min(state.at + QUIET, now + state.budget) for state in blocking)
            self._changed.clear()
            if until > now:
                try:
                    await asyncio.wait_for(self._changed.wait(), until - now)
                except asyncio.TimeoutError:
                    pass
            later = time.monotonic()
            for state in blocking:
                state.budget -= later - now
                if state.budget <= 0 and later >= state.aside:
                    state.aside = later + ASIDE
                    self.set_aside += 1
                    logger.warning(
                        "a subscriber of %r kept its large frames waiting for %gs; it is not "
                        "waited for during the next %gs (%d set aside so far)",
                        topic,
                        BUDGET,
                        ASIDE,
                        self.set_aside,
                    )
            now = later
            blocking = self._blocking(topic, size, now)
        self.waited += now - started
