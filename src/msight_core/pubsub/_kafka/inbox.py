"""Fetched Kafka records to deliveries: :class:`Inbox`.

Runs on the consumer thread. Each record of a partition assigned here goes
through, in turn:

* the :class:`~.chunks.Reassembler` when it is a chunk of a split frame (the
  frame goes on once whole);
* the :class:`~.order.Sequencer` when its key is a sequence stamp (held back
  only while an earlier message of its publisher may still come);
* the output deque, as a :class:`~.._core.Delivery` (a plain tuple of its fields).

A group member's delivery carries the token ``(partition, offset, generation)``
where ``offset`` is what may be committed once the application processed it:
past the record, but never past an unfinished frame or a message held for
order in that partition (a restart must not lose them).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from ...config import KafkaConfig
from ...tracing import enabled as tracing_enabled
from .._core import Delivery
from .chunks import CHUNK_HEADER, FRAME_TIMEOUT, Reassembler
from .holes import Holes
from .order import Sequencer
from .stamps import FRAME_MAGIC, SEQ_MAGIC

__all__ = ["Inbox"]

TP = tuple  # (topic, partition)
_MAGICS = (SEQ_MAGIC, FRAME_MAGIC)


class Inbox:
    """Reassembly, order and commit-safe tokens for one consumer.

    Args:
        config: the backend's settings (bounds: ``queue.max_bytes`` and
            ``max_message_bytes`` for unfinished frames and held messages,
            ``queue.max_messages``; ``order_wait``).
        grouped: deliveries carry tokens (group members commit offsets).
        gens: the consumer's partition -> generation map (read only here).
        out: where deliveries go, in order.
        on_error: called with a record's ``KafkaError``.
        seek: moves a partition's fetch position (``Consumer.seek``): a batch
            that skipped records is read again (:mod:`.holes`).
    """

    def __init__(
        self,
        config: KafkaConfig,
        grouped: bool,
        gens: dict[TP, int],
        out: deque[Delivery],
        on_error: Callable[[Any], None],
        seek: Callable[[Any], None],
    ) -> None:
        budget = max(config.queue.max_bytes, config.max_message_bytes)
        self.grouped = grouped
        self.gens = gens
        self.out = out
        self.on_error = on_error
        self.chunks = Reassembler(budget)
        self.holes = Holes(seek)
        emit = self._emit_token if grouped else self._emit
        self.order = Sequencer(
            config.order_wait,
            budget,
            config.queue.max_messages,
            emit,
            grouped,
            out.append,
            out.extend,
        )
        self._last_evict = 0.0

    # -- records --------------------------------------------------------------------------

    def handle(self, msgs: list[Any]) -> None:
        """Take a fetched batch, in order."""
        msgs = self.holes.check(msgs)
        if not self.grouped and not self.chunks.partial and not self.order.held_count:
            # Broadcast, nothing pending: plain unstamped records (raw producers,
            # ``ordered`` publishers) go straight out, as cheaply as possible.
            append, magics = self.out.append, _MAGICS
            for index, m in enumerate(msgs):
                stamp = m.key()
                if (
                    m.error() is not None
                    or m.headers() is not None
                    or stamp is not None
                    and stamp[:4] in magics
                ):
                    self._handle(msgs[index:])
                    return
                append((m.topic(), m.value() or b"", None, None))  # a plain Delivery
            return
        self._handle(msgs)

    def _handle(self, msgs: list[Any]) -> None:
        self.order.trace = tracing_enabled()  # once per fetched batch
        self.order.take(msgs, self.gens, self._other)

    def _other(self, m: Any) -> None:
        """A record the sequencer's fast path does not take, in its turn."""
        err = m.error()
        if err is not None:
            self.on_error(err)
            return
        key = (m.topic(), m.partition())
        if key not in self.gens:
            return  # revoked meanwhile
        offset = start = m.offset()
        data = m.value()
        headers = m.headers()
        if headers is not None:
            chunk = next((v for k, v in headers if k == CHUNK_HEADER), None)
            if chunk is not None:
                frame = self.chunks.add(key, offset, chunk, data)
                if frame is None:
                    return
                data, start = frame
        if data is None:
            data = b""
        # A group member's delivery needs its end offset; a broadcast one only the bytes.
        if headers is not None:  # what reaches the application: the sender's (trace context)
            headers = [(k, v) for k, v in headers if k != CHUNK_HEADER] or None
        item = (
            (data, offset + 1, headers) if self.grouped else Delivery(key[0], data, None, headers)
        )
        stamp = m.key()
        if stamp is not None and stamp[:4] in _MAGICS:
            self.order.add(item, key, start, stamp, len(data))
        else:
            self.order.emit(item, key, start)

    def _emit(self, item: Delivery, key: TP, start: int) -> None:
        self.out.append(item)

    def _emit_token(self, item: tuple[Any, ...], key: TP, start: int) -> None:
        data, safe = item[0], item[1]
        headers = item[2] if len(item) > 2 else None
        if self.chunks.partial:
            safe = self.chunks.first_offset(key, safe)
        pins = self.order.pins.get(key)
        if pins and pins[0] < safe:
            safe = pins[0]
        gen = self.gens.get(key)
        if gen is not None:
            self.out.append((key[0], data, (key[1], safe, gen), headers))  # a plain Delivery

    # -- positions ------------------------------------------------------------------------

    def assign(self, keys: Iterable[TP]) -> None:
        """Partitions (re)positioned here: ``assign``, or after a rewind."""
        by_topic: dict[str, list[int]] = {}
        for topic, part in keys:
            by_topic.setdefault(topic, []).append(part)
        for topic, parts in by_topic.items():
            self.order.assign(topic, parts)
            self.holes.forget((topic, part) for part in parts)

    def revoke(self, keys: set[TP]) -> None:
        """Partitions no longer read here, or about to be rewound."""
        self.chunks.forget(keys)
        self.order.revoke(keys)
        self.holes.forget(keys)

    def rewind(self, topic: str) -> None:
        """``topic`` was moved back: its publishers' order starts again."""
        self.order.reset(topic)

    def stats(self) -> dict[str, int]:
        """Order restoration (:class:`~.order.Sequencer`) and holes read again (:mod:`.holes`)."""
        order, holes = self.order, self.holes
        return {
            "order_gaps": order.gaps,
            "order_late": order.late,
            "unordered": order.unordered,
            "fetch_rereads": holes.rereads,
            "fetch_offsets_skipped": holes.skipped,
        }

    # -- timers ---------------------------------------------------------------------------

    def tick(self, now: float, paused: bool) -> float | None:
        """Give up waits that took too long; return when to come back (monotonic)."""
        if self.chunks.partial and not paused and now - self._last_evict >= 1.0:
            self._last_evict = now
            self.chunks.evict(now)
        deadline = self.order.expire(now) if self.order.held_count else None
        if self.chunks.partial and not paused:
            due = now + min(1.0, FRAME_TIMEOUT)
            deadline = due if deadline is None else min(deadline, due)
        return deadline

    @property
    def pending(self) -> bool:
        """Something is held: unfinished frames or messages waiting for order."""
        return bool(self.chunks.partial or self.order.held_count)
