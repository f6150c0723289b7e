"""The Kafka receiving side: :class:`Subscriber`.

One librdkafka consumer per backend, used by one thread at a time (:mod:`.._turns`):
the reader thread, or the application's thread while it waits in ``listen()``
with nothing queued (then the batch it fetches is handed out on the same
thread). Other threads post commands, run by whichever thread has the turn.

* With a ``group_id`` the consumer joins the group (partitions are shared).
  On assignment, partitions without a committed offset get a concrete start
  (``start``: earliest/latest) which is committed at once, so whichever member
  owns a partition later starts from the same place.
* Without one, the instance assigns itself every partition (no group: each
  subscriber gets everything) and commits nothing.
* Wildcard patterns (:mod:`.patterns`): a group member subscribes with a Kafka
  regex; a broadcast subscriber lists the cluster's topics every metadata
  refresh interval and assigns those that match. Topics that appear later are
  read from their start.
* Messages go to the :class:`~.._core.ReceiveQueue` only while it has room; when
  it is full the partitions are paused (backpressure, nothing dropped).
* Offsets are committed only for messages the application acknowledged
  (:mod:`.commits`): every second, on revocation and on close.
* Records become deliveries in the :class:`~.inbox.Inbox`: split frames are
  reassembled, each publisher's order restored (:mod:`.order`); the committed
  offset never passes an unfinished frame or a message held for order.
* Each assignment of a partition gets a new generation, carried in the
  delivery's token: :attr:`Subscriber.generations` tells the backend that a queued
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

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from ...config import KafkaConfig
from ...errors import BrokerUnavailableError, ConfigError, MsightError
from .._core import Delivery, ReceiveQueue
from .._turns import Turns
from .commits import Commits
from .errors import TOPIC_MISSING, translate
from .inbox import Inbox
from .patterns import Patterns, kafka_regex
from .positions import seek_targets, start_positions
from .settings import METADATA_REFRESH_MS, consumer_conf, unique_group_id

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

    Writing to ``acks`` and reading ``generations`` are cheap and fine from any
    thread; the other calls block until the reader thread has done the work.
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
        self._known: set[str] = set()  # ungrouped: topics assigned here
        self._patterns = Patterns()
        refresh = self.consumer_setting("topic.metadata.refresh.interval.ms", METADATA_REFRESH_MS)
        self._refresh = max(0.1, float(refresh) / 1000)
        self._last_scan = time.monotonic()
        self._gen: dict[TP, int] = {}  # assigned partitions -> generation
        self._next_gen = 0
        self._assign_count = 0
        self.commits = Commits(self.consumer, self._gen)
        self.acks = self.commits.acks
        """The token of the last processed delivery per partition (see :mod:`.commits`)."""
        self.generations = self._gen
        """Partition -> generation (read only outside): a delivery whose token
        carries another generation was revoked or rewound since it was queued."""
        self._leftover: deque[Delivery] = deque()
        self.inbox = Inbox(
            config,
            self.grouped,
            self._gen,
            self._leftover,
            self._on_record_error,
            self.consumer.seek,
        )
        self._paused = False
        self._stop = False
        self._last_pending_check = 0.0
        self._wake: float | None = None  # when the inbox wants a tick (monotonic)
        self._outage_logged = False
        self.rebalances = 0
        self._turns = Turns()
        self._thread = threading.Thread(target=self._run, name="msight-kafka-reader", daemon=True)
        self._thread.start()

    @property
    def incomplete_frames_dropped(self) -> int:
        """Split frames given up (malformed, a chunk missing, too late, over a bound)."""
        return self.inbox.chunks.dropped

    def order_stats(self) -> dict[str, int]:
        """Counters of the order restoration and re-read fetches (:meth:`.Inbox.stats`)."""
        return self.inbox.stats()

    # -- caller side ------------------------------------------------------------------

    def call(self, fn: Callable[[], Any], timeout: float) -> Any:
        """Run ``fn`` on the reader thread and return its result."""
        future: Future[Any] = Future()
        with self._cond:
            self._cmds.append((fn, future))
        self._turns.wake_reader()
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
        before = self.call(lambda: self._subscribe_group(name), self._timeout + 5)
        self._await_assignment(
            f"topic {name!r}", lambda: any(key[0] == name for key in self._gen), before
        )

    def subscribe_pattern(self, pattern: str) -> None:
        """Follow every topic ``pattern`` matches, now and later.

        Returns once the topics that match now are assigned (for a group member:
        once the group rebalanced; at once when nothing matches yet).

        Raises:
            BrokerUnavailableError: no assignment within the bound.
        """
        if not self.grouped:
            self.call(lambda: self._watch(pattern), self._timeout * 3 + 5)
            return
        before, matched = self.call(lambda: self._watch_group(pattern), self._timeout + 5)
        if matched:
            self._await_assignment(f"pattern {pattern!r}", lambda: self._assign_count > before)

    def _await_assignment(
        self, what: str, done: Callable[[], bool], before: int | None = None
    ) -> None:
        """Group member: wait until ``done()``. With ``before`` (the assignment count
        before subscribing), also return once a rebalance since left ``done()``
        false for a session timeout: the other members own all of it.

        Raises:
            BrokerUnavailableError: neither within the bound.
        """
        session = float(self.consumer_setting("session.timeout.ms", 45000)) / 1000
        bound = 3 * session + self._timeout
        deadline = time.monotonic() + bound
        settled_at: float | None = None
        with self._cond:
            while not done():
                now = time.monotonic()
                if before is not None and settled_at is None and self._assign_count > before:
                    settled_at = now
                if settled_at is not None and now - settled_at > session:
                    return
                if now >= deadline:
                    raise BrokerUnavailableError(
                        f"Kafka: no partition assignment for {what} in group "
                        f"{self.config.group_id!r} within {bound:g}s"
                    )
                self._cond.wait(min(deadline - now, 0.2))

    def consumer_setting(self, key: str, default: Any) -> Any:
        merged = {**dict(self.config.client), **dict(self.config.consumer)}
        return merged.get(key, default)

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
        turns = self._turns
        try:
            while not self._stop:
                if not turns.stand_aside():
                    with turns.lock:
                        if not self._stop:
                            self._step(0.1)
        except Exception as exc:  # noqa: BLE001 - logged and raised by listen() (_failed)
            self._failed(exc)
        finally:
            with turns.lock:
                self._shutdown()

    def _failed(self, exc: Exception) -> None:
        logger.exception("Kafka reader failed")
        self.queue.fail(translate(exc, "consuming"))
        self._stop = True

    def pull(self, wait: float) -> list[Delivery] | None:
        """``listen()`` is here for more: the reader thread stands aside (see
        :mod:`.._turns`). With ``wait > 0``, fetch on the calling thread for up to
        ``wait`` seconds unless the reader queued something meanwhile, and return
        the deliveries fetched (for ``listen()`` to hand out; none: ``[]``);
        ``None`` if the consumer was not free or the subscriber is stopping."""
        if self._stop:
            return None
        return self._turns.pull(self._pulled_step, wait)  # type: ignore[no-any-return]

    def _pulled_step(self, wait: float) -> list[Delivery]:
        try:
            if not self._stop and not len(self.queue):
                return self._step(wait, direct=True)
        except Exception as exc:  # noqa: BLE001 - as on the reader thread (_failed)
            self._failed(exc)
        return []

    def _step(self, wait: float, direct: bool = False) -> list[Delivery]:
        """One turn at the consumer: commands, a fetch (at most ``wait`` s), housekeeping.
        ``direct`` (the listening thread): a batch nothing queued is ahead of is
        returned, not queued, as far as the queue's bounds allow (the queue cost
        a 1 KB drain about a tenth)."""
        consumer = self.consumer
        self._run_commands()
        if self._leftover:
            self.queue.offer(self._leftover)
        if self._leftover:
            if not self._paused:
                self._pause(True)
            self._handle(consumer.consume(_BATCH, min(wait, 0.05)))
            return []
        if self._paused:
            self._pause(False)
        if self._wake is not None:
            wait = min(wait, max(0.0, self._wake - time.monotonic()))
        taken: list[Delivery] = []
        msg = consumer.poll(wait)
        if msg is not None:
            batch = [msg]
            batch.extend(consumer.consume(_BATCH - 1, 0))
            self._handle(batch)
            if direct and not len(self.queue):
                taken = self.queue.fitting(self._leftover)  # within the queue's bounds
            if self._leftover:
                self.queue.offer(self._leftover)
        self._housekeeping()
        return taken

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
        if self.grouped and now - self.commits.last >= _COMMIT_INTERVAL:
            self.commits.commit(asynchronous=True)
        if self._pending and now - self._last_pending_check >= 1.0:
            self._last_pending_check = now
            for name in list(self._pending):
                self._assign_all(name)
        if self._patterns and not self.grouped and now - self._last_scan >= self._refresh:
            self._scan()
        if self._wake is not None and now >= self._wake or self.inbox.pending:
            self._wake = self.inbox.tick(now, self._paused)

    def _on_record_error(self, err: Any) -> None:
        if err.code() not in _IGNORED:
            self._on_error(err)

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

    def _topic_names(self, timeout: float) -> list[str]:
        metadata = self.consumer.list_topics(timeout=timeout)
        return [n for n, t in metadata.topics.items() if t.error is None and not n.startswith("__")]

    def _watch_group(self, pattern: str) -> tuple[int, bool]:
        existing = self._topic_names(self._timeout)
        self._patterns.add(pattern, existing)
        matcher = Patterns()
        matcher.add(pattern, ())
        return self._subscribe_group(kafka_regex(pattern)), any(map(matcher.matches, existing))

    def _watch(self, pattern: str) -> None:
        self._patterns.add(pattern, self._topic_names(self._timeout))
        self._scan()

    def _scan(self) -> None:
        """Broadcast: assign the topics that match a pattern and are not assigned yet."""
        self._last_scan = time.monotonic()
        try:
            names = self._topic_names(min(1.0, self._timeout))
        except (KafkaException, RuntimeError) as exc:
            logger.debug("listing Kafka topics for wildcard subscriptions failed: %s", exc)
            return
        for name in sorted(names):
            if name not in self._known and self._patterns.matches(name):
                self._assign_all(name)

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
        self._known.add(name)
        parts = [TopicPartition(name, p) for p in sorted(topic.partitions)]
        parts = self._positions(parts, commit=False)
        self.consumer.incremental_assign(parts)
        self._took(parts)

    def _positions(self, parts: list[TopicPartition], commit: bool) -> list[TopicPartition]:
        def earliest(topic: str) -> bool:
            return (
                topic in self._from_start
                or self.config.start == "earliest"
                or self._patterns.is_new(topic)  # appeared after its pattern
            )

        return start_positions(self.consumer, parts, commit, earliest, self._timeout)

    def _took(self, parts: list[TopicPartition], rebalance: bool = True) -> None:
        self.inbox.assign(key_of(p) for p in parts)
        with self._cond:
            for p in parts:
                self._next_gen += 1
                self._gen[(p.topic, p.partition)] = self._next_gen
            if rebalance:
                self._assign_count += 1
                self.rebalances += 1
            self._cond.notify_all()
        if rebalance and parts:
            # librdkafka keeps a partition's pause across a re-assignment: give the
            # new ones the state of the rest, which the reader loop then changes
            # as one (a partition left paused would never be read again).
            (self.consumer.pause if self._paused else self.consumer.resume)(parts)

    def _on_assign(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        try:
            parts = self._positions(parts, commit=True)
        except (KafkaException, RuntimeError) as exc:
            logger.warning("Kafka: reading committed offsets failed (%s); using reset", exc)
        consumer.assign(parts)
        self._took(parts)

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        self.commits.commit(asynchronous=False, only={(p.topic, p.partition) for p in parts})
        self._drop(parts)

    def _on_lost(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        self._drop(parts)

    def _drop(self, parts: list[TopicPartition]) -> None:
        keys = {(p.topic, p.partition) for p in parts}
        with self._cond:
            for key in keys:
                self._gen.pop(key, None)
            self._cond.notify_all()
        self.inbox.revoke(keys)
        self.commits.forget(keys)
        if self._leftover and self.grouped:
            # In place: the inbox appends to this very deque.
            kept = [d for d in self._leftover if (d[0], d[2][0]) not in keys]  # topic, partition
            self._leftover.clear()
            self._leftover.extend(kept)

    def _seek(self, name: str, where: Any) -> int:
        keys = [key for key in self._gen if key[0] == name]
        if not keys:
            return 0
        targets = seek_targets(self.consumer, keys, where, self._timeout)
        # Deliveries from the old position still queued are skipped (new generation).
        self._drop(targets)
        self.inbox.rewind(name)
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
        self.inbox.handle(msgs)
        if self._outage_logged and msgs:
            self._outage_logged = False
        if self.inbox.pending and self._wake is None:
            self._wake = self.inbox.tick(time.monotonic(), self._paused)

    def _pause(self, pause: bool) -> None:
        parts = [TopicPartition(t, p) for t, p in self._gen]
        if parts:
            (self.consumer.pause if pause else self.consumer.resume)(parts)
        self._paused = pause

    def _shutdown(self) -> None:
        try:
            if self.grouped:
                # A named topic to ask about (a regex would be looked up, or created, by name).
                topic = next((t for t in self._topics if not t.startswith("^")), None)
                self.commits.final(topic, min(1.0, self._timeout))
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
