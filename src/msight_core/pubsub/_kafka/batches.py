"""The sequencer's hot loop: :class:`Batches`, the part of
:class:`~.order.Sequencer` that takes a whole fetched batch of Kafka records.

Kept apart from :mod:`.order` (which has the rules) because it is written for
speed rather than for reading: in a drain almost every record goes through it,
and almost every record is held a moment, since Kafka hands out a run of one
partition and then of the next while a publisher's seqs go round them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .runs import MAX_AHEAD, Runs
from .stamps import SEQ_MAGIC, SEQ_STRUCT

__all__ = ["MAX_AHEAD", "Batches"]

TP = tuple  # (topic, partition)

_unpack = SEQ_STRUCT.unpack
_SIZE = SEQ_STRUCT.size


class Batches(Runs):
    """Mixed into :class:`~.order.Sequencer`: its state, its slow path (``_add``)."""

    # Set by the Sequencer (declared for readers and type checkers).
    pin: bool
    bare: bool
    trace: bool
    """Tracing is on in this process: stamped records with headers take the slow
    path, which carries the headers (trace context) to their delivery."""
    emit: Callable[[Any, TP, int], None]
    append: Callable[[Any], None] | None
    extend: Callable[[Any], None]
    states: dict[tuple[str, bytes], Any]
    pins: dict[TP, Any]
    _unpinned: dict[TP, dict[int, int]]
    now: float
    held_count: int
    held_bytes: int
    max_count: int
    max_bytes: int
    _add: Callable[..., None]
    _advance: Callable[[Any, int], None]
    _shed: Callable[[], None]
    flush_batch: Callable[[], None]

    def take(self, msgs: list[Any], gens: dict[TP, int], other: Callable[[Any], None]) -> None:
        """Take a fetched batch of Kafka records, in order, and end it.

        Records with a plain stamp (:data:`SEQ_MAGIC`) are ordered here; every
        other record (errors, unstamped, chunks of split frames) goes to
        ``other(record)`` in its turn. Records of partitions not in ``gens``
        (revoked meanwhile) are skipped. Items are made here: ``(value, offset + 1)``
        with ``pin``, else a :class:`~.._core.Delivery`, handed to ``append``.

        A broadcast subscriber takes whole partition runs at once where it can
        (:mod:`.runs`); the rest goes through :meth:`_take_each`.
        """
        self.now = time.monotonic()
        if self.bare and self.extend is not None:
            self._take_runs(msgs, gens, other)
        else:
            self._take_each(msgs, gens, other)
        self.flush_batch()

    def _take_each(
        self, msgs: list[Any], gens: dict[TP, int], other: Callable[[Any], None]
    ) -> None:
        """:meth:`take` record by record (without ending the batch).

        Written for speed too: the stamp is one ``struct`` unpack, the
        publisher's state is looked up once per run of records of one publisher
        in one partition (Kafka hands out such runs), and the two common cases
        (the next one in turn; one to hold while the next one is awaited from
        another partition) are handled inline.
        """
        pin, emit, slow = self.pin, self.emit, self._add
        bare = self.bare
        trace = self.trace
        direct = self.append if bare else None
        states, max_count = self.states, self.max_count
        unpack, size, magic = _unpack, _SIZE, SEQ_MAGIC
        last_part, last_pid, last_topic = -1, b"", ""
        key: TP = ("", -1)
        state: Any = None
        for m in msgs:
            stamp = m.key()
            if stamp is None or len(stamp) != size:
                other(m)
                continue
            tag, pid, seq, n = unpack(stamp)
            if tag != magic or trace and m.headers() is not None:
                other(m)  # trace context to carry: the slow path keeps headers
                continue
            part = m.partition()
            topic = m.topic()
            if part != last_part or pid != last_pid or topic != last_topic:
                key = (topic, part)
                if key not in gens:
                    last_part = -1
                    continue
                state = states.get((topic, pid))
                if state in self.pend:
                    self._spill(state)  # held as whole runs: record by record from here
                last_part, last_pid, last_topic = part, pid, topic
            data = m.value()
            if data is None:
                data = b""
            offset = m.offset()
            if state is None or state.fresh or state.n != n or (state.base + seq) % n != part:
                item = (data, offset + 1) if pin else (topic, data, None, None)
                slow(item, key, offset, pid, seq, n, len(data))
                state = states.get((topic, pid))  # made, or replaced
                continue
            expected = state.next
            if seq == expected:
                if direct is not None:
                    direct((topic, data, None, None))
                else:
                    item = (data, offset + 1) if pin else (topic, data, None, None)
                    emit(item, key, offset)
                seq += 1
                if state.held or (state.base + seq) % n not in state.mask:
                    self._advance(state, seq)
                else:
                    state.next = seq
            elif (
                state.waiting
                and expected is not None
                and expected < seq <= expected + MAX_AHEAD
                and seq not in state.held
                and self.held_count < max_count
            ):
                # Held while the next one is awaited (a drain reads one partition
                # after another): the same as add(), inline.
                top = state.top
                if seq > top.get(part, -1):
                    top[part] = seq
                nbytes = len(data)
                state.held[seq] = data if bare else ((data, offset + 1), key, offset, nbytes)
                self.held_count += 1
                self.held_bytes += nbytes
                if pin:
                    pins = self.pins.get(key)
                    if pins is not None and pins[-1] < offset:
                        pins.append(offset)
                    else:
                        self._pin(key, offset)
                if self.held_bytes > self.max_bytes:
                    self._shed()
                if (state.base + expected) % n == part:
                    self._advance(state, expected)  # a later one came in its partition
            else:
                item = (data, offset + 1) if pin else (topic, data, None, None)
                slow(item, key, offset, pid, seq, n, len(data))
                state = states.get((topic, pid))

    def _pin(self, key: TP, offset: int) -> None:
        pins = self.pins.get(key)
        if pins is None:
            pins = self.pins[key] = deque()
        pins.append(offset)
        if len(pins) > 1 and offset < pins[-2]:
            self.pins[key] = deque(sorted(pins))  # a split frame starts before others

    def _unpin(self, key: TP, offset: int) -> None:
        pins = self.pins.get(key)
        if pins is None:
            return
        if pins[0] != offset:
            gone = self._unpinned.setdefault(key, {})
            gone[offset] = gone.get(offset, 0) + 1
            return
        pins.popleft()
        gone = self._unpinned.get(key)
        while pins and gone and pins[0] in gone:
            done = pins.popleft()
            if gone[done] <= 1:
                del gone[done]
            else:
                gone[done] -= 1
        if gone is not None and not gone:
            del self._unpinned[key]
        if not pins:
            del self.pins[key]
            self._unpinned.pop(key, None)
