"""Per-publisher order over spread partitions, on the receiving side: :class:`Sequencer`.

The stamp each msight publisher puts in its records' keys, and where a
publisher's seq goes, are in :mod:`.stamps`.

Receiving side. :class:`Sequencer` hands each publisher's messages out in
seq order, per topic, among the seqs of the partitions this subscriber owns
(all of them for a broadcast subscriber or a lone group member; its share for
a group member). One publisher's records are in seq order within a partition
(the publisher assigns seqs and produces under one lock), so a seq is known to
be missing for good as soon as a later record of its publisher arrives in its
partition. Only a message whose predecessor may still be in flight is held
back, bounded in time (``wait``), count and bytes; a predecessor that does not
come in time is given up (counted in ``gaps``, like one known to be missing).
Nothing is held when nothing is missing. A message older than what was already
handed out for its publisher (a gap given up, a previous owner's backlog after
a rebalance, a redelivery) is handed out at once and counted in ``late``;
records without a stamp (raw producers) and records whose stamp does not
add up (malformed, wrong partition, far out of sequence) pass through as they
come, the latter counted in ``unordered``.

Stamps are peer input: sizes and values are checked; a forged stamp costs
its own message (passed through) or, if it claims a place in a real
publisher's sequence, that publisher's order for at most ``wait`` seconds;
other publishers are never held by it. One thread only (the consumer thread).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from .batches import MAX_AHEAD, Batches
from .stamps import SEQ_STRUCT

__all__ = ["FIRST_WAIT", "MAX_AHEAD", "MAX_ROTATION", "Sequencer"]

logger = logging.getLogger("msight_core.pubsub.kafka")

#: Partitions a rotation may name (Kafka allows fewer than this per topic in practice).
MAX_ROTATION = 4096
#: Publisher states kept per subscriber; idle ones are forgotten first.
MAX_STATES = 4096
#: Seconds a publisher first seen mid-stream is held for what may precede it.
FIRST_WAIT = 0.25

TP = tuple  # (topic, partition)

_unpack = SEQ_STRUCT.unpack
_SIZE = SEQ_STRUCT.size


class _State:
    """One publisher on one topic, as seen by this subscriber."""

    __slots__ = (
        "base", "first", "floor", "fresh", "held", "jump", "last", "mask", "mine", "n", "next",
        "since", "top", "topic", "waiting",
    )  # fmt: skip

    def __init__(self, topic: str, n: int, base: int, owned: set[int]) -> None:
        self.topic = topic
        self.n = n
        self.base = base
        self.mask = owned  # the topic's partitions owned here (shared by its states)
        self.mine = any(p < n for p in owned)
        self.next: int | None = None  # lowest seq of our share not handed out or given up
        self.first = 0  # lowest seq of the first batch it was seen in
        self.held: dict[int, tuple[Any, TP, int, int]] = {}  # seq -> (item, key, offset, size)
        self.fresh: set[int] = set()  # partitions picked up since, nothing seen there yet
        self.floor: dict[int, int] = {}  # such a partition -> the first seq seen there
        self.top: dict[int, int] = {}  # partition -> highest seq held there since positioned
        self.since = 0.0  # monotonic time the wait for ``next`` began
        self.waiting = False
        self.jump: int | None = None  # a far-ahead seq seen once (the stream moved on?)
        self.last = 0.0


class Sequencer(Batches):
    """Restores each publisher's order among the partitions this subscriber owns.

    Args:
        wait: seconds a message is held for a predecessor that may be in flight.
        max_bytes: bytes held at most (then the oldest wait is given up).
        max_count: messages held at most (likewise).
        emit: called with ``(item, key, offset)`` for each message handed out, in order.
        pin: keep the offsets of held messages (group members, which commit).
        append: without ``pin``, where :meth:`take` puts the deliveries it makes
            (``emit`` then gets those deliveries as items too); ``extend``: the
            same for many at once (whole runs are then taken at once, :mod:`.runs`).

    ``take()`` takes a fetched batch of Kafka records (``add()`` one stamped
    record, then ``flush_batch()`` ends the batch); ``expire()`` is called regularly. With ``pin``, ``pins`` maps each partition
    with a held message to their offsets in the order they came (``pins[key][0]``:
    the lowest; a commit must not pass it).
    """

    def __init__(
        self,
        wait: float,
        max_bytes: int,
        max_count: int,
        emit: Callable[[Any, TP, int], None],
        pin: bool = True,
        append: Callable[[Any], None] | None = None,
        extend: Callable[[Any], None] | None = None,
    ) -> None:
        self.wait = wait
        self.append, self.extend = append, extend  # type: ignore[assignment]
        # Without pins, a held entry is just the message's bytes, made a delivery
        # when handed out: most records of a drain are held a while, and bytes
        # are no work for Python's cyclic GC (a delivery, a tuple subclass, is).
        self.bare = not pin and append is not None
        self.trace = False
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.emit = emit
        self.pin = pin
        self.now = time.monotonic()
        """The caller's clock, set once per fetched batch (saves a call per record)."""
        self.states: dict[tuple[str, bytes], _State] = {}
        self.owned: dict[str, set[int]] = {}
        self.held_bytes = 0
        self.held_count = 0
        self.pins: dict[TP, deque[int]] = {}
        self._unpinned: dict[TP, dict[int, int]] = {}
        self._fresh: list[_State] = []  # states first seen in the current batch
        self._waiting: dict[int, _State] = {}  # id -> state holding something
        self.pend: dict[_State, dict[int, list[Any]]] = {}  # held as whole runs (.runs)
        self.gaps = 0
        """Messages of a publisher never received: known missing, or waited for in vain."""
        self.late = 0
        """Messages older than what was already handed out for their publisher."""
        self.unordered = 0
        """Stamped records passed through unordered (stamp malformed or inconsistent)."""

    # -- ownership --------------------------------------------------------------------

    def assign(self, topic: str, partitions: Iterable[int]) -> None:
        """Partitions of ``topic`` newly owned here, read from a new position."""
        fresh = set(partitions)
        self.owned.setdefault(topic, set()).update(fresh)
        for state in self.states.values():
            if state.topic == topic:
                state.mine = any(p < state.n for p in state.mask)
                state.fresh.update(fresh)
                for p in fresh:
                    state.floor.pop(p, None)
                    state.top.pop(p, None)

    def revoke(self, keys: Iterable[TP]) -> None:
        """Partitions no longer read here (or rewound): their held messages are
        dropped (their new owner, or the new position, delivers them again)."""
        self._spill_all()
        by_topic: dict[str, set[int]] = {}
        for topic, part in keys:
            by_topic.setdefault(topic, set()).add(part)
            self.pins.pop((topic, part), None)
            self._unpinned.pop((topic, part), None)
        for topic, parts in by_topic.items():
            self.owned.setdefault(topic, set()).difference_update(parts)
            for state in [s for s in self.states.values() if s.topic == topic]:
                state.fresh.difference_update(parts)
                for p in parts:
                    state.floor.pop(p, None)
                    state.top.pop(p, None)
                state.mine = any(p < state.n for p in state.mask)
                for seq, entry in list(state.held.items()):
                    _, key, _, size = self._entry(state, seq, entry)
                    if key[1] in parts:
                        del state.held[seq]
                        self.held_bytes -= size
                        self.held_count -= 1
                if state.next is not None:
                    self._advance(state, state.next)
                elif not state.held:
                    self._idle(state)
            if not self.owned[topic]:
                # Nothing of the topic left here (an eager rebalance revokes all): what
                # comes back is read from the committed offsets, so order starts anew.
                self.reset(topic)

    def reset(self, topic: str) -> None:
        """Forget every publisher of ``topic`` (after a replay: a new beginning)."""
        for sid, state in list(self.states.items()):
            if state.topic == topic:
                self._release_all(state)
                del self.states[sid]

    # -- records ----------------------------------------------------------------------

    def add(self, item: Any, key: TP, offset: int, stamp: bytes, size: int) -> None:
        """Take a stamped record (``stamp``: its Kafka key, starting with
        :data:`SEQ_MAGIC` or :data:`~.stamps.FRAME_MAGIC`; ``offset``: where it
        starts in its partition)."""
        if len(stamp) != _SIZE:
            self._unordered(item, key, offset)
            return
        _, pid, seq, n = _unpack(stamp)
        self._add(item, key, offset, pid, seq, n, size)

    def _add(
        self, item: Any, key: TP, offset: int, pid: bytes, seq: int, n: int, size: int
    ) -> None:
        topic, part = key
        state = self.states.get((topic, pid))
        if state in self.pend:
            self._spill(state)
        if state is None or state.n != n or (state.base + seq) % n != part:
            if not 0 < n <= MAX_ROTATION or part >= n:
                self._unordered(item, key, offset)
                return
            if state is not None and state.n == n:
                self._unordered(item, key, offset)  # does not fit its rotation
                return
            if state is not None:  # the topic grew: a new rotation
                self._release_all(state)
            state = self._new_state((topic, pid), topic, n, (part - seq) % n)
        if state.fresh and part in state.fresh:
            state.fresh.discard(part)
            state.floor[part] = seq  # the first here since it was picked up
        expected = state.next
        if seq == expected:
            self.emit(item, key, offset)
            seq += 1
            # Nothing held: every record seen so far was before ``seq`` (``top`` is
            # only kept for held ones, the only ones that can be ahead of ``next``).
            if state.held or (state.base + seq) % n not in state.mask:
                self._advance(state, seq)
            else:
                state.next = seq
        elif expected is None:  # first seen in this batch: ordered at the batch's end
            self._hold(state, seq, item, key, offset, size)
        elif seq < expected:
            self.late += 1
            self.emit(item, key, offset)
        elif seq - expected > MAX_AHEAD:
            if state.jump is not None and 0 < seq - state.jump <= MAX_AHEAD:
                # Far ahead twice, consistently: the stream moved on (a long gap).
                self._release_all(state)
                state.jump = None
                self.gaps += 1
                self.emit(item, key, offset)
                self._advance(state, seq + 1)
            else:
                state.jump = seq
                self._unordered(item, key, offset)
        elif seq in state.held:
            self.emit(item, key, offset)  # the same seq again (redelivered): pass it on
        elif state.waiting and self.held_count < self.max_count:
            # The common hold (a drain reads partitions one after the other), inline.
            if seq > state.top.get(part, -1):
                state.top[part] = seq
            state.held[seq] = (
                (item[1] if item[3] is None else item) if self.bare else (item, key, offset, size)
            )
            self.held_count += 1
            self.held_bytes += size
            if self.pin:
                self._pin(key, offset)
            if self.held_bytes > self.max_bytes:
                self._shed()
            if (state.base + expected) % n == part:
                self._advance(state, expected)  # a later one came in its partition
        else:
            self._hold(state, seq, item, key, offset, size)
            if (state.base + expected) % n == part:
                self._advance(state, expected)  # a later one came in its partition

    def flush_batch(self) -> None:
        """End of a fetched batch: publishers first seen in it start at their lowest seq."""
        if self._fresh:
            fresh, self._fresh = self._fresh, []
            for state in fresh:
                if state.next is None and state.held:
                    # Its records just before these may be in other partitions, not
                    # fetched yet or before where they were picked up: one rotation
                    # back is where a stream read from one instant can begin.
                    state.first = min(state.held)
                    self._advance(state, max(0, state.first - state.n + 1))
        if self.held_bytes > self.max_bytes or self.held_count > self.max_count:
            self._shed()

    def expire(self, now: float) -> float | None:
        """Give up predecessors waited for longer than ``wait``; return the next
        deadline (monotonic), ``None`` when nothing is held."""
        deadline = self._expire_runs(now) if self.pend else None
        self.now = now
        for state in list(self._waiting.values()):
            if not state.held or state.next is None:
                continue
            wait = self._wait_for(state)
            if now - state.since >= wait:
                self._give_up(state)
            if state.held:
                due = state.since + self._wait_for(state)
                deadline = due if deadline is None or due < deadline else deadline
        return deadline

    # -- internals --------------------------------------------------------------------

    def _wait_for(self, state: _State) -> float:
        if state.next is not None and state.next < state.first and state.first >= state.n:
            # Missing before the first one seen, when that one was not among the
            # publisher's first messages: most likely sent before this subscriber
            # started, so a short wait. (Seqs below n are its very beginning.)
            return min(FIRST_WAIT, self.wait)
        return self.wait

    def _new_state(self, sid: tuple[str, bytes], topic: str, n: int, base: int) -> _State:
        if len(self.states) >= MAX_STATES:
            self._forget_idle()
        state = _State(topic, n, base, self.owned.setdefault(topic, set()))
        self.states[sid] = state
        self._fresh.append(state)
        return state

    def _forget_idle(self) -> None:
        now = self.now
        idle = [
            k
            for k, s in self.states.items()
            if not (s.held or s.waiting) and now - s.last > self.wait
        ]
        for sid in idle or list(self.states)[: MAX_STATES // 4]:
            self._release_all(self.states.pop(sid))

    def _unordered(self, item: Any, key: TP, offset: int) -> None:
        self.unordered += 1
        self.emit(item, key, offset)

    def _hold(self, state: _State, seq: int, item: Any, key: TP, offset: int, size: int) -> None:
        if seq in state.held:  # the same seq again (re-sent) before its publisher's start
            self.emit(item, key, offset)  # is known: passed on (held twice, counted once)
            return
        part, top = key[1], state.top
        if seq > top.get(part, -1):
            top[part] = seq
        state.last = self.now
        if not state.waiting:
            state.waiting = True
            state.since = self.now
            self._waiting[id(state)] = state
        state.held[seq] = (
            (item[1] if item[3] is None else item) if self.bare else (item, key, offset, size)
        )
        self.held_bytes += size
        self.held_count += 1
        if self.pin:
            self._pin(key, offset)
        if state.next is not None and (
            self.held_bytes > self.max_bytes or self.held_count > self.max_count
        ):
            self._shed()

    def _entry(self, state: _State, seq: int, entry: Any) -> tuple[Any, TP, int, int]:
        """``(item, key, offset, size)`` of a held entry."""
        if self.bare:  # the bytes, or a whole Delivery when it carries headers
            item = (state.topic, entry, None, None) if type(entry) is bytes else entry
            return item, (state.topic, (state.base + seq) % state.n), -1, len(item[1])
        return entry  # type: ignore[no-any-return]

    def _take(self, state: _State, seq: int) -> None:
        item, key, offset, size = self._entry(state, seq, state.held.pop(seq))
        self.held_bytes -= size
        self.held_count -= 1
        if self.pin:
            self._unpin(key, offset)
        self.emit(item, key, offset)

    def _advance(self, state: _State, seq: int) -> None:
        """Set ``next`` to ``seq`` or the first seq after it still to come here,
        handing out held messages that are now in turn."""
        mask, n, base, held, top = state.mask, state.n, state.base, state.held, state.top
        if not state.mine:
            state.next = seq
            return
        emit, pin, pop, append = self.emit, self.pin, held.pop, self.append
        bare, topic = self.bare, state.topic
        released = released_bytes = 0
        while True:
            entry = pop(seq, None)
            if entry is not None and bare:
                released += 1
                if type(entry) is bytes:
                    released_bytes += len(entry)
                    append((topic, entry, None, None))  # a plain delivery
                else:  # a Delivery with headers
                    released_bytes += len(entry[1])
                    append(entry)
                seq += 1
                continue
            if entry is not None:
                item, key, offset, size = entry
                released += 1
                released_bytes += size
                if pin:
                    pins = self.pins.get(key)
                    if pins is not None and pins[0] == offset and key not in self._unpinned:
                        pins.popleft()  # the usual case: released in the order held
                        if not pins:
                            del self.pins[key]
                    else:
                        self._unpin(key, offset)
                    emit(item, key, offset)
                else:
                    emit(item, key, offset)
                seq += 1
                continue
            part = (base + seq) % n
            if part not in mask:
                seq += 1  # another member's share
                continue
            seen = top.get(part)
            if seen is not None and seq < seen:
                # A later record of this publisher came in that partition: this one
                # was before where the partition was picked up, or it is lost.
                if seq >= state.floor.get(part, -1) and seq >= state.first:
                    self.gaps += 1
                seq += 1
                continue
            break
        state.next = seq
        if released:
            self.held_count -= released
            self.held_bytes -= released_bytes
            state.since = self.now
        if not held and state.waiting:
            self._idle(state)

    def _idle(self, state: _State) -> None:
        state.waiting = False
        self._waiting.pop(id(state), None)

    def _give_up(self, state: _State) -> None:
        if state.next is not None and state.next < state.first:
            # Still before the first one seen: what came is handed out, in order.
            for seq in sorted(s for s in state.held if s < state.first):
                self._take(state, seq)
            state.since = self.now
            self._advance(state, state.first)
            return
        lowest = min(state.held)
        expected = max(state.first, state.next if state.next is not None else lowest)
        missing = sum(
            1
            for s in range(expected, min(lowest, expected + 4 * state.n))
            if (state.base + s) % state.n in state.mask
        )
        self.gaps += missing
        logger.debug("gave up waiting for %d message(s) on %r", missing, state.topic)
        state.since = self.now
        self._advance(state, lowest)

    def _shed(self) -> None:
        """Over the byte or count bound: give up the oldest waits until under it."""
        while self._waiting and (
            self.held_bytes > self.max_bytes or self.held_count > self.max_count
        ):
            oldest = min(self._waiting.values(), key=lambda s: s.since)
            self._spill(oldest)
            if not oldest.held:
                self._idle(oldest)
                continue
            self._give_up(oldest)

    def _release_all(self, state: _State) -> None:
        self._spill(state)
        for seq in sorted(state.held):
            self._take(state, seq)
        self._idle(state)
