"""The Kafka receiving side: :class:`Subscriber`.

One librdkafka consumer per backend, owned by one reader thread: every call on
it (subscribe, assign, commit, seek, close) runs on that thread, so no
confluent-kafka object is shared between threads. Other threads post commands.

* With a ``group_id`` the consumer joins the group (partitions are shared).
  On assignment, partitions without a committed offset get a concrete start
  (``start``: earliest/latest) which is committed at once, so whichever member
  owns a partition later starts from the same place.
* Without one, the instance assigns itself every partition (no group: each
  subscriber gets everything) and commits nothing.
* Messages go to the :class:`~.._core.ReceiveQueue` only while it has room; when
  it is full the partitions are paused (backpressure, nothing dropped).
* Offsets are committed only for messages the application acknowledged
  (see :meth:`Subscriber.ack`): every second, on revocation and on close.
* Frames split by the publisher (:mod:`.chunks`) are reassembled; the
  committed offset never passes the first chunk of an unfinished frame.
* Each assignment of a partition gets a new generation, carried in the
  delivery's token: :meth:`Subscriber.current` tells the backend that a queued
  delivery's partition was revoked or rewound since, so it is not handed out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from ...config import KafkaConfig
from ...errors import BrokerUnavailableError, ConfigError, MsightError
from .._core import Delivery, ReceiveQueue
from .chunks import CHUNK_HEADER, Reassembler
from .errors import TOPIC_MISSING, translate
from .settings import consumer_conf, unique_group_id

__all__ = ["Subscriber"]

logger = logging.getLogger("msight_core.pubsub.kafka")

_BATCH = 1000
_COMMIT_INTERVAL = 1.0
# Topics may appear after subscribe(): their absence is no outage.
_IGNORED = TOPIC_MISSING | {KafkaError._PARTITION_EOF}

TP = tuple  # (topic, partition)


def key_of(tp: TopicPartition) -> TP:
    return (tp.topic, tp.partition)


class Subscriber:
    """Consumer thread feeding a :class:`ReceiveQueue`.

    Args:
        config: the backend's settings (``group_id`` decides group or broadcast).
        queue: where deliveries go; the backend's ``listen()`` reads it.

    ``ack()`` and ``current()`` are cheap and callable from any thread; the other
    calls block until the reader thread has done the work.
    """

    def __init__(self, config: KafkaConfig, queue: ReceiveQueue) -> None:
        self.config = config
        self.queue = queue
        self.grouped = config.group_id is not None
        group = config.group_id if config.group_id is not None else unique_group_id()
        try:
            self.consumer = Consumer(consumer_conf(config, group, self._on_error))
        except (KafkaException, ValueError, TypeError) as exc:
            raise ConfigError(f"invalid Kafka consumer settings: {exc}") from None
        self._timeout = config.connect_timeout
        self._cmds: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._cond = threading.Condition()
        self._topics: list[str] = []
        self._from_start: set[str] = set()  # topics this instance saw created
        self._pending: set[str] = set()  # ungrouped: topics that do not exist yet
        self._gen: dict[TP, int] = {}  # assigned partitions -> generation
        self._next_gen = 0
        self._assign_count = 0
        self._ack_lock = threading.Lock()
        self._acked: dict[TP, int] = {}
        self._chunks = Reassembler()
        self._leftover: deque[Delivery] = deque()
        self._paused = False
        self._stop = False
        self._last_commit = time.monotonic()
        self._last_pending_check = 0.0
        self._last_evict = 0.0
        self._outage_logged = False
        self.rebalances = 0
        self._thread = threading.Thread(target=self._run, name="msight-kafka-reader", daemon=True)
        self._thread.start()

    @property
    def incomplete_frames_dropped(self) -> int:
        """Split frames given up unfinished (a chunk missing, or too late)."""
        return self._chunks.dropped

    # -- caller side ------------------------------------------------------------------

    def call(self, fn: Callable[[], Any], timeout: float) -> Any:
        """Run ``fn`` on the reader thread and return its result."""
        future: Future[Any] = Future()
        with self._cond:
            self._cmds.append((fn, future))
        return future.result(timeout)

    def subscribe(self, name: str, created: bool) -> None:
        """Add ``name``; return once its partitions are assigned with positions.

        Raises:
            BrokerUnavailableError: no assignment within the bound.
        """
        if created:
            self._from_start.add(name)
        if not self.grouped:
            self.call(lambda: self._assign_all(name), self._timeout * 3 + 5)
            return
        session = float(self.consumer_setting("session.timeout.ms", 45000)) / 1000
        bound = 3 * session + self._timeout
        before = self.call(lambda: self._subscribe_group(name), self._timeout + 5)
        deadline = time.monotonic() + bound
        settled_at: float | None = None
        with self._cond:
            while not any(key[0] == name for key in self._gen):
                now = time.monotonic()
                if settled_at is None and self._assign_count > before:
                    settled_at = now
                if settled_at is not None and now - settled_at > session:
                    # A rebalance completed without giving us any of this topic and
                    # none followed: the other members own all of its partitions.
                    return
                if now >= deadline:
                    raise BrokerUnavailableError(
                        f"Kafka: no partition assignment for topic {name!r} in group "
                        f"{self.config.group_id!r} within {bound:g}s"
                    )
                self._cond.wait(min(deadline - now, 0.2))

    def consumer_setting(self, key: str, default: Any) -> Any:
        merged = {**dict(self.config.client), **dict(self.config.consumer)}
        return merged.get(key, default)

    def ack(self, topic: str, token: tuple[int, int, int]) -> None:
        """Record that the application processed a delivery (cheap, any thread)."""
        partition, offset, gen = token
        key = (topic, partition)
        if self._gen.get(key) == gen:
            with self._ack_lock:
                self._acked[key] = offset

    def current(self, topic: str, token: tuple[int, int, int]) -> bool:
        """False if the delivery's partition was revoked or rewound since."""
        return self._gen.get((topic, token[0])) == token[2]

    def replay(self, name: str, where: Any) -> int:
        """Rewind ``name``'s assigned partitions; returns how many were moved."""
        return int(self.call(lambda: self._seek(name, where), self._timeout * 2 + 5))

    def close(self) -> None:
        """Commit what was processed and leave the group; bounded in time.

        Blocks for one round trip when the broker is reachable; at most
        ``min(connect_timeout, publish.timeout) + 1`` seconds when it is not (the
        reader thread then finishes on its own, nothing more can be committed).
        """
        with self._cond:
            self._stop = True
        bound = min(self._timeout, self.config.publish.timeout) + 1.0
        self._thread.join(bound)
        if self._thread.is_alive():
            logger.warning(
                "Kafka consumer did not close within %gs (broker unreachable?); "
                "uncommitted messages will be delivered again",
                bound,
            )

    # -- reader thread ------------------------------------------------------------------

    def _run(self) -> None:
        consumer = self.consumer
        try:
            while not self._stop:
                self._run_commands()
                if self._leftover:
                    self.queue.offer(self._leftover)
                if self._leftover:
                    if not self._paused:
                        self._pause(True)
                    self._handle(consumer.consume(_BATCH, 0.05))
                    continue
                if self._paused:
                    self._pause(False)
                msg = consumer.poll(0.1)
                if msg is not None:
                    batch = [msg]
                    batch.extend(consumer.consume(_BATCH - 1, 0))
                    self._handle(batch)
                    self.queue.offer(self._leftover)
                self._housekeeping()
        except Exception as exc:  # the thread must report, never die silently
            logger.exception("Kafka reader failed")
            self.queue.fail(translate(exc, "consuming"))
        finally:
            self._shutdown()

    def _run_commands(self) -> None:
        while self._cmds:
            with self._cond:
                fn, future = self._cmds.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's future
                future.set_exception(exc)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if self.grouped and now - self._last_commit >= _COMMIT_INTERVAL:
            self._commit(asynchronous=True)
        if self._pending and now - self._last_pending_check >= 1.0:
            self._last_pending_check = now
            for name in list(self._pending):
                self._assign_all(name)
        if self._chunks.partial and now - self._last_evict >= 1.0:
            self._last_evict = now
            self._chunks.evict(now)

    def _on_error(self, err: Any) -> None:
        if err.code() in _IGNORED:
            return
        if not self._outage_logged:
            self._outage_logged = True
            logger.warning("Kafka consumer: %s (retrying)", err.str())

    # -- assignment -----------------------------------------------------------------------

    def _subscribe_group(self, name: str) -> int:
        self._topics.append(name)
        before = self._assign_count
        self.consumer.subscribe(
            list(self._topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        return before

    def _assign_all(self, name: str) -> None:
        metadata = self.consumer.list_topics(name, timeout=self._timeout)
        topic = metadata.topics.get(name)
        if topic is None or topic.error is not None or not topic.partitions:
            if name not in self._pending:
                logger.warning(
                    "Kafka topic %r does not exist yet; it is assigned when it appears", name
                )
                self._pending.add(name)
                self._from_start.add(name)  # everything in it is newer than subscribe()
            return
        self._pending.discard(name)
        parts = [TopicPartition(name, p) for p in sorted(topic.partitions)]
        parts = self._positions(parts, commit=False)
        self.consumer.incremental_assign(parts)
        self._took(parts)

    def _positions(self, parts: list[TopicPartition], commit: bool) -> list[TopicPartition]:
        """Concrete start offsets: committed, else earliest/latest resolved now."""
        if commit:
            parts = self.consumer.committed(parts, timeout=self._timeout)
        else:
            parts = [TopicPartition(p.topic, p.partition) for p in parts]
        missing = [p for p in parts if p.offset < 0]
        if missing:
            query = []
            for p in missing:
                earliest = p.topic in self._from_start or self.config.start == "earliest"
                query.append(TopicPartition(p.topic, p.partition, -2 if earliest else -1))
            try:
                resolved = self.consumer.offsets_for_times(query, timeout=self._timeout)
            except KafkaException as exc:
                logger.warning("could not resolve Kafka start offsets (%s); using reset", exc)
                for p, q in zip(missing, query, strict=True):
                    p.offset = OFFSET_BEGINNING if q.offset == -2 else OFFSET_END
                return parts
            by_key = {(r.topic, r.partition): r.offset for r in resolved}
            for p, q in zip(missing, query, strict=True):
                offset = by_key.get((p.topic, p.partition), -1)
                if offset < 0:
                    offset = OFFSET_BEGINNING if q.offset == -2 else OFFSET_END
                p.offset = offset
            fixed = [
                TopicPartition(p.topic, p.partition, p.offset) for p in missing if p.offset >= 0
            ]
            if commit and fixed:
                # Later owners of these partitions start here too, so nothing
                # published during a rebalance is skipped by "latest".
                try:
                    self.consumer.commit(offsets=fixed, asynchronous=False)
                except KafkaException as exc:
                    logger.warning("could not commit Kafka start offsets: %s", exc)
        return parts

    def _took(self, parts: list[TopicPartition], rebalance: bool = True) -> None:
        with self._cond:
            for p in parts:
                self._next_gen += 1
                self._gen[(p.topic, p.partition)] = self._next_gen
            if rebalance:
                self._assign_count += 1
                self.rebalances += 1
                self._paused = False
            self._cond.notify_all()

    def _on_assign(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        try:
            parts = self._positions(parts, commit=True)
        except (KafkaException, RuntimeError) as exc:
            logger.warning("Kafka: reading committed offsets failed (%s); using reset", exc)
        consumer.assign(parts)
        self._took(parts)

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        self._commit(asynchronous=False, only={(p.topic, p.partition) for p in parts})
        self._drop(parts)

    def _reachable(self) -> bool:
        """True if a broker answers a metadata request within a second."""
        topic = self._topics[0] if self._topics else None
        try:
            self.consumer.list_topics(topic, timeout=min(1.0, self._timeout))
        except (KafkaException, RuntimeError):
            return False
        return True

    def _on_lost(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        self._drop(parts)

    def _drop(self, parts: list[TopicPartition]) -> None:
        keys = {(p.topic, p.partition) for p in parts}
        with self._cond:
            for key in keys:
                self._gen.pop(key, None)
            self._chunks.forget(keys)
            self._cond.notify_all()
        with self._ack_lock:
            for key in keys:
                self._acked.pop(key, None)
        if self._leftover:
            self._leftover = deque(d for d in self._leftover if (d.topic, d.token[0]) not in keys)

    def _seek(self, name: str, where: Any) -> int:
        keys = [key for key in self._gen if key[0] == name]
        if not keys:
            return 0
        if isinstance(where, str):
            query = [TopicPartition(t, p, -2 if where == "earliest" else -1) for t, p in keys]
        elif isinstance(where, float):
            query = [TopicPartition(t, p, int(where * 1000)) for t, p in keys]
        else:
            query = [TopicPartition(t, p, int(where)) for t, p in keys]
        if not isinstance(where, int):
            query = self.consumer.offsets_for_times(query, timeout=self._timeout)
        targets = [
            TopicPartition(q.topic, q.partition, q.offset if q.offset >= 0 else OFFSET_END)
            for q in query
        ]
        # Deliveries from the old position still queued are skipped (new generation).
        self._drop(targets)
        for target in targets:
            try:
                self.consumer.seek(target)
            except KafkaException as exc:  # not fetching yet: position it through assign
                logger.debug("seek %s[%d] failed (%s); re-assigning", *key_of(target), exc)
                self.consumer.incremental_unassign([target])
                self.consumer.incremental_assign([target])
        self._took(targets, rebalance=False)
        return len(targets)

    # -- messages ---------------------------------------------------------------------------

    def _handle(self, msgs: list[Any]) -> None:
        if not self.grouped and not self._chunks.partial:
            # Hot path for broadcast subscribers: plain records need no offsets.
            append = self._leftover.append
            for index, m in enumerate(msgs):
                if m.error() is not None or m.headers() is not None:
                    self._handle_slow(msgs[index:])
                    break
                append(Delivery(m.topic(), m.value() or b"", None))
            return
        self._handle_slow(msgs)

    def _handle_slow(self, msgs: list[Any]) -> None:
        gens = self._gen
        out = self._leftover
        grouped = self.grouped
        chunks = self._chunks
        partial = chunks.partial
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() not in _IGNORED:
                    self._on_error(err)
                continue
            topic = m.topic()
            part = m.partition()
            key = (topic, part)
            gen = gens.get(key)
            if gen is None:
                continue  # revoked meanwhile
            offset = m.offset()
            headers = m.headers()
            data = m.value()
            if headers is not None:
                chunk = next((v for k, v in headers if k == CHUNK_HEADER), None)
                if chunk is not None:
                    data = chunks.add(key, offset, chunk, data)
                    if data is None:
                        continue
            safe = chunks.first_offset(key, offset + 1) if partial else offset + 1
            if data is None:
                data = b""
            # Only group members commit, so only their deliveries carry a token.
            token = (part, safe, gen) if grouped else None
            out.append(Delivery(topic, data, token, headers))  # headers: trace context
        if self._outage_logged and msgs:
            self._outage_logged = False

    def _pause(self, pause: bool) -> None:
        parts = [TopicPartition(t, p) for t, p in self._gen]
        if parts:
            (self.consumer.pause if pause else self.consumer.resume)(parts)
        self._paused = pause

    # -- offsets ----------------------------------------------------------------------------

    def _commit(self, asynchronous: bool, only: set[TP] | None = None) -> None:
        self._last_commit = time.monotonic()
        with self._ack_lock:
            if only is None:
                acked, self._acked = self._acked, {}
            else:
                acked = {k: self._acked.pop(k) for k in only if k in self._acked}
        offsets = [TopicPartition(t, p, o) for (t, p), o in acked.items() if (t, p) in self._gen]
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=offsets, asynchronous=asynchronous)
        except (KafkaException, RuntimeError) as exc:
            err = translate(exc, "committing offsets")
            logger.warning("%s; the messages may be delivered again", err)

    def _shutdown(self) -> None:
        try:
            if self.grouped and self._acked:
                if self._reachable():
                    self._commit(asynchronous=False)
                else:
                    # A commit would wait ~6 s for a coordinator that is not there.
                    with self._ack_lock:
                        count = len(self._acked)
                        self._acked.clear()
                    logger.warning(
                        "Kafka broker unreachable on close: the offsets of %d partition(s) "
                        "were not committed; their processed messages will come again",
                        count,
                    )
        finally:
            try:
                self.consumer.close()
            except (KafkaException, RuntimeError) as exc:
                if not isinstance(exc, MsightError):
                    logger.debug("Kafka consumer close: %s", exc)
            with self._cond:
                for _, future in self._cmds:
                    future.cancel()
                self._cmds.clear()
