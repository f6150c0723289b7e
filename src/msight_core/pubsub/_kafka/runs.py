"""The sequencer's bulk path: whole partition runs at C speed (:class:`Runs`).

A drain reads one partition's run of records, then the next one's, while a
publisher's seqs go round the partitions: about ``(n - 1) / n`` of the records
are held until the other partitions' runs come. Doing that record by record
(a stamp unpacked, a dict entry, then a pop and a delivery each) cost a drain
more than fetching the records. Here a run of one publisher in one partition
is checked and held as a whole, and what is in turn is handed out as a whole,
with ``map``/``zip``/slices over the run instead of Python code per record.

Only the plain case is taken here, and only when the result is exactly what
the per-record path (:mod:`.batches`, :mod:`.order`) gives: a broadcast
subscriber (no pins), a known publisher positioned in every partition of its
rotation, a run of consecutive seqs of one publisher on one topic that goes on
where its partition left off. Anything else (a gap, a publisher seen for the
first time, a record out of place, forged or odd stamps, several publishers
interleaved in a partition, trace headers) goes to the per-record path, which
has all the rules; so does a release that finds a hole in what is held.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from itertools import groupby, repeat
from typing import Any

from confluent_kafka import Message

from .stamps import SEQ_MAGIC, SEQ_STRUCT

__all__ = ["MAX_AHEAD", "MIN_RUN", "Runs"]

#: Seqs a record may run ahead of the next expected one and still be held for order.
MAX_AHEAD = 65536
#: Runs shorter than this take the per-record path (not worth the set-up).
MIN_RUN = 8

TP = tuple  # (topic, partition)

_SIZE = SEQ_STRUCT.size  # magic 0-3, publisher id 4-11, seq 12-19, partitions 20-23
# Every byte of a stamp but the seq's: the same in all records of one publisher's run.
_FIXED = (*range(12), *range(20, _SIZE))
_key, _part, _topic, _value = Message.key, Message.partition, Message.topic, Message.value
_headers = Message.headers
_seq_structs: dict[int, struct.Struct] = {}


def _seqs(count: int, joined: bytes) -> tuple[int, ...]:
    """The seqs of ``count`` stamps laid end to end, in one C call."""
    reader = _seq_structs.get(count)
    if reader is None:
        if len(_seq_structs) >= 256:
            _seq_structs.clear()
        reader = _seq_structs[count] = struct.Struct(">" + "12xQ4x" * count)
    return reader.unpack(joined)  # type: ignore[no-any-return]


class Runs:
    """Mixed into :class:`~.order.Sequencer` (through :class:`~.batches.Batches`)."""

    # Set by the Sequencer (declared for readers and type checkers).
    states: dict[tuple[str, bytes], Any]
    held_count: int
    trace: bool
    held_bytes: int
    max_count: int
    max_bytes: int
    now: float
    extend: Callable[[Any], None]
    _waiting: dict[int, Any]
    _advance: Callable[[Any, int], None]
    _idle: Callable[[Any], None]
    _shed: Callable[[], None]
    _take_each: Callable[[list[Any], dict[TP, int], Callable[[Any], None]], None]
    _wait_for: Callable[[Any], float]
    pend: dict[Any, dict[int, list[Any]]]

    def _take_runs(
        self, msgs: list[Any], gens: dict[TP, int], other: Callable[[Any], None]
    ) -> None:
        """A fetched batch (broadcast), run by run of one partition."""
        keys = list(map(_key, msgs))
        start = 0
        for part, group in groupby(map(_part, msgs)):
            end = start + len(list(group))
            if end - start < MIN_RUN or not self._run(msgs, keys, start, end, part, gens):
                self._take_each(msgs[start:end], gens, other)
            start = end

    def _run(
        self, msgs: list[Any], keys: list[Any], start: int, end: int, part: int, gens: Any
    ) -> bool:
        """Hold and hand out ``msgs[start:end]`` (one partition) as a whole; ``False``:
        nothing was done, the run is not the plain case."""
        count = end - start
        try:
            joined = b"".join(keys[start:end])
        except TypeError:  # a record without a key: an error or a raw producer's
            return False
        first = keys[start]
        if len(joined) != _SIZE * count or first[:4] != SEQ_MAGIC:
            return False
        for i in _FIXED:  # one publisher, one rotation: only the seq bytes change
            if joined[i::_SIZE] != first[i : i + 1] * count:
                return False
        run = msgs[start:end]
        if self.trace and any(map(_headers, run)):
            return False  # trace context to carry: the per-record path keeps headers
        topic = _topic(run[0])
        if list(map(_topic, run)).count(topic) != count:
            return False  # two topics interleaved
        key = (topic, part)
        if key not in gens:
            return True  # revoked meanwhile: skipped, like the per-record path
        n = int.from_bytes(first[20:], "big")
        state = self.states.get((topic, first[4:12]))
        if state is None or state.fresh or state.n != n or state.next is None:
            return False
        seqs, nxt, base = _seqs(count, joined), state.next, state.base
        s0 = seqs[0]
        last = s0 + (count - 1) * n
        if (
            (base + s0) % n != part
            or seqs != tuple(range(s0, last + 1, n))
            or s0 < nxt
            or last - nxt > MAX_AHEAD
            or self.held_count + count > self.max_count
            or not state.mine
            or not state.mask.issuperset(range(n))
        ):
            return False
        # It must go on where the partition left off: right after what is held
        # there, or at the partition's first seq from ``next`` (else a gap: the
        # per-record path counts it).
        top = state.top.get(part, -1)
        if s0 != (top + n if top >= nxt else nxt + (part - base - nxt) % n):
            return False
        values = list(map(_value, run))
        try:
            nbytes = sum(map(len, values))
        except TypeError:  # a record without a value (a tombstone): empty bytes
            values = [v if v is not None else b"" for v in values]
            nbytes = sum(map(len, values))
        runs = self.pend.get(state)
        if runs is None:
            if not state.held:
                runs = self.pend[state] = {}
            elif self._compact(state, count):
                runs = self.pend[state]
        if runs is not None:  # held as whole runs
            held = runs.get(part)
            if held is None:
                runs[part] = [s0, values]
            else:
                held[1] += values
        else:  # held in the per-record path's dict
            state.held.update(zip(range(s0, last + 1, n), values))
        state.top[part] = last
        self.held_count += count
        self.held_bytes += nbytes
        state.last = self.now
        if not state.waiting:
            state.waiting = True
            state.since = self.now
            self._waiting[id(state)] = state
        if self.held_bytes > self.max_bytes:
            self._shed()
        if state in self.pend:
            self._release_runs(state, self.pend[state])
        elif state.held and state.next is not None:
            self._release(state)
        return True

    # -- held as whole runs -------------------------------------------------------------
    #
    # ``pend[state]`` maps each partition of the publisher's rotation to
    # ``[seq, values]``: its held messages, seqs ``seq, seq + n, ...``, where ``seq``
    # is the partition's first seq from ``state.next`` (nothing missing in
    # between, or the run would not have been taken). ``state.held`` is empty
    # meanwhile; the per-record path gets the dict back first (``_spill``).

    def _compact(self, state: Any, count: int) -> bool:
        """Move ``state.held`` into runs, if it is laid out as runs would be."""
        held, n, nxt, base, top = state.held, state.n, state.next, state.base, state.top
        if len(held) > 8 * count:
            return False  # not worth a try: the dict path
        runs: dict[int, list[Any]] = {}
        total = 0
        for p in range(n):
            if top.get(p, -1) >= nxt:
                first = nxt + (p - base - nxt) % n
                values = list(map(held.get, range(first, top[p] + 1, n)))
                if set(map(type, values)) != {bytes}:
                    return False  # a hole, or a message with headers
                runs[p] = [first, values]
                total += len(values)
        if total != len(held):
            return False
        held.clear()
        self.pend[state] = runs
        return True

    def _spill(self, state: Any) -> None:
        """Back into ``state.held`` (for the per-record path)."""
        runs = self.pend.pop(state, None)
        if runs:
            n = state.n
            for first, values in runs.values():
                state.held.update(zip(range(first, first + len(values) * n, n), values))

    def _spill_all(self) -> None:
        for state in list(self.pend):
            self._spill(state)

    def _expire_runs(self, now: float) -> float | None:
        """Waits held as runs: those due go back to the dict (``expire`` gives them
        up); returns the earliest deadline of the others."""
        deadline = None
        for state in list(self.pend):
            due = state.since + self._wait_for(state)
            if now >= due:
                self._spill(state)
            elif deadline is None or due < deadline:
                deadline = due
        return deadline

    def _release_runs(self, state: Any, runs: dict[int, list[Any]]) -> None:
        """Hand out what is in turn: the runs interleaved by slice assignment."""
        nxt, n, base = state.next, state.n, state.base
        order = [(base + nxt + j) % n for j in range(n)]  # partitions from ``next`` on
        avail = [len(runs[p][1]) if p in runs else 0 for p in order]
        rounds = min(avail)
        stop = avail.index(rounds)  # the first partition to run out
        total = rounds * n + stop
        if not total:
            return
        chunk: list[Any] = [None] * total
        for j, p in enumerate(order):
            take = rounds + 1 if j < stop else rounds
            if take:
                held = runs[p]
                values = held[1]
                chunk[j::n] = values[:take]
                if take == len(values):
                    del runs[p]
                else:
                    del values[:take]
                    held[0] += take * n
        state.next = nxt + total
        self.held_count -= total
        self.held_bytes -= sum(map(len, chunk))
        state.since = self.now
        if not runs:
            del self.pend[state]
            self._idle(state)
        self.extend(zip(repeat(state.topic), chunk, repeat(None), repeat(None)))

    def _release(self, state: Any) -> None:
        """Hand out what is in turn from ``state.next`` as a whole (the per-record
        ``_advance`` if anything in that stretch is not a plain held message)."""
        nxt, n, base, top, held = state.next, state.n, state.base, state.top, state.held
        # Held in each partition: from its first seq from ``next`` up to ``top``
        # (each run went on where the last one ended); so all is there up to the
        # first partition's next seq after its top.
        end = min(
            top[p] + n if top.get(p, -1) >= nxt else nxt + (p - base - nxt) % n for p in range(n)
        )
        if end <= nxt:
            return
        seqs = range(nxt, end)
        chunk = list(map(held.get, seqs))
        if set(map(type, chunk)) != {bytes}:  # a hole, or a message with headers
            self._advance(state, nxt)
            return
        deque(map(held.__delitem__, seqs), 0)
        state.next = end
        self.held_count -= len(chunk)
        self.held_bytes -= sum(map(len, chunk))
        state.since = self.now
        if not held:
            self._idle(state)
        # Plain tuples for deliveries (see Delivery): the fields are (topic, data, token, headers).
        self.extend(zip(repeat(state.topic), chunk, repeat(None), repeat(None)))
