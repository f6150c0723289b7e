"""The Kafka publishing side: :class:`Publisher`.

One idempotent, ``acks=all`` librdkafka producer per backend. ``publish()``
only hands the record to librdkafka, which batches (``linger.ms``) and sends in
the background; a daemon thread serves delivery reports. Reports come only for
failures (``delivery.report.only.error``); a failure that cannot be repaired is
counted per topic and raised as :class:`PublishError` from the next
``publish()``, ``flush()`` or ``close()``. librdkafka gives up on a message
after ``message.timeout.ms`` (:func:`~.settings.delivery_timeout`).

Recovery, with no user code:

* **The broker lost the producer's idempotence state** (a restarted in-memory
  broker, or an expired producer id on a real Kafka): librdkafka raises a fatal
  error, or (tansu) keeps bumping its epoch while the broker rejects every
  request. A fatal producer cannot be reused, so the report thread builds a new
  one, purges the old one and re-produces everything the old one reported as
  not delivered (queued or in flight): at-least-once, duplicates only among
  what was in flight.
* **A topic disappeared** (deleted, or a broker that lost its metadata):
  deliveries fail with an unknown topic/partition; the topic's cached limit is
  dropped, the topic is created again (the library's partitions and
  ``max.message.bytes``) and the failed messages are re-produced.

A re-produced message is given up (and reported) once it could not be
delivered within another ``delivery_timeout``.

Order and balance (:mod:`.order`): each message takes this publisher's next
seq on its topic and the next partition in turn (its key is the stamp), under
one lock, so a partition holds one publisher's records in seq order. With
``KafkaConfig.ordered``: one partition per publisher (a random key), no stamp.
Frames above the topic's ``max.message.bytes`` are split (:mod:`.chunks`) into
one partition under the same lock; other records' values are the published bytes.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import deque
from typing import Any, NamedTuple

from confluent_kafka import KafkaException, Producer

from ...config import KafkaConfig
from ...errors import BackpressureError, ConfigError, MsightError, PublishError
from . import errors as kerr
from .admin import TopicAdmin, partition_count
from .chunks import RECORD_OVERHEAD, FrameIds, split
from .settings import delivery_timeout, producer_conf
from .stamps import Stamper, as_frame

__all__ = ["Publisher"]

logger = logging.getLogger("msight_core.pubsub.kafka")

_POLL_INTERVAL = 0.05
#: Seconds a replaced producer is polled for the reports of its purged messages.
_RETIRE_WAIT = 5.0
_ENSURE_INTERVAL = 1.0


class _Retry(NamedTuple):
    topic: str
    value: bytes
    key: Any
    headers: Any
    deadline: float  # monotonic: give up (report) after this
    reason: str
    partition: int  # where it was sent (-1: let librdkafka choose)


class Publisher:
    """Producer, delivery-report thread, recovery and the per-topic frame limits.

    Args:
        config: the backend's settings.
        admin: creates topics and tells their limits (shared with the backend).

    ``publish()`` is thread-safe and does not wait for the broker.
    """

    def __init__(self, config: KafkaConfig, admin: TopicAdmin) -> None:
        self.config = config
        self.admin = admin
        self._key = os.urandom(8) if config.ordered else None
        self._frame_ids = FrameIds()
        self._limits: dict[str, int] = {}
        self._learn_lock = threading.Lock()
        self._fail_lock = threading.Lock()
        # Held around taking a seq and produce() (so one partition gets this
        # publisher's records in seq order), across a split frame, and around the
        # producer swap (nothing goes into a retired one).
        self._swap_lock = threading.RLock()
        self._failed: dict[str, int] = {}
        self._reasons: dict[str, str] = {}
        self._retry: deque[_Retry] = deque()
        self._missing: dict[str, float] = {}  # vanished topic -> next ensure attempt
        self._rebuild_reason: str | None = None
        self._retiring: list[tuple[Producer, kerr.EpochWatch, float]] = []
        self._closing = False
        self._outage_logged = False
        self._stop = threading.Event()
        self._timeout = delivery_timeout(config)
        self._epochs = kerr.EpochWatch(self.request_rebuild)
        self.producer = self._new_producer(self._epochs)
        self._stamps = Stamper(
            self._frame_ids.prefix,
            lambda name: partition_count(self.producer, name, config.connect_timeout),
        )
        self.max_record = int(producer_conf(config, None, None)["message.max.bytes"])
        self.published = 0
        self.chunked_frames = 0
        self.failed_total = 0
        self.rebuilds = 0
        self.resent = 0
        self._thread = threading.Thread(target=self._serve, name="msight-kafka-dr", daemon=True)
        self._thread.start()

    def _new_producer(self, epochs: kerr.EpochWatch) -> Producer:
        try:
            return Producer(producer_conf(self.config, self._on_delivery, self._on_error, epochs))
        except (KafkaException, ValueError, TypeError) as exc:
            raise ConfigError(f"invalid Kafka producer settings: {exc}") from None

    # -- callbacks (report thread, or a thread in flush()) -------------------------------

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._failed_delivery(err, msg, None, None)

    def _on_delivery_with(self, headers: Any, deadline: float | None, err: Any, msg: Any) -> None:
        # Reports carry no headers (confluent-kafka): chunks and re-sends bring theirs.
        if err is not None:
            self._failed_delivery(err, msg, headers, deadline)

    def _failed_delivery(self, err: Any, msg: Any, headers: Any, deadline: float | None) -> None:
        topic = msg.topic() or "?"
        code = err.code()
        if not self._closing and (code in kerr.PRODUCER_LOST or code in kerr.TOPIC_MISSING):
            now = time.monotonic()
            if deadline is None:
                deadline = now + self._timeout
            if now < deadline:
                if code in kerr.TOPIC_MISSING:  # the topic is gone: create it again
                    self._missing.setdefault(topic, 0.0)
                # Producer-lost codes come from a producer already being replaced
                # (error_cb/poll report the fatal error itself): just re-send.
                value, key, part = msg.value() or b"", msg.key(), msg.partition()
                self._retry.append(_Retry(topic, value, key, headers, deadline, err.str(), part))
                return
        self._record_failure(topic, err.str())

    def _record_failure(self, topic: str, reason: str, count: int = 1) -> None:
        with self._fail_lock:
            first = topic not in self._failed
            self._failed[topic] = self._failed.get(topic, 0) + count
            self._reasons.setdefault(topic, reason)
            self.failed_total += count
        if first:
            logger.error("Kafka delivery to topic %r failed: %s", topic, reason)

    def _on_error(self, err: Any) -> None:
        if kerr.is_fatal(err):
            self.request_rebuild(err.str())
        elif not self._outage_logged:
            self._outage_logged = True
            logger.warning("Kafka producer: %s (buffering and retrying)", err.str())

    def request_rebuild(self, reason: str) -> None:
        """Ask the report thread to replace the producer (it failed for good)."""
        if self._rebuild_reason is None and not self._closing:
            self._rebuild_reason = reason
            logger.warning("Kafka producer failed: %s; replacing it", reason)

    # -- report thread ----------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                if self.producer.poll(_POLL_INTERVAL) and self._outage_logged:
                    self._outage_logged = False
            except KafkaException as exc:
                self._poll_failed(exc)
            except Exception:  # never let a callback error kill the report thread
                logger.exception("Kafka delivery-report thread error")
            try:
                self._repair()
            except Exception:
                logger.exception("Kafka producer recovery error")
                time.sleep(_POLL_INTERVAL)

    def _poll_failed(self, exc: KafkaException) -> None:
        err = kerr.fatal_error(exc)
        if err is not None:
            self.request_rebuild(err.str())  # poll() raises while the producer is fatal
        else:
            logger.warning("Kafka producer poll: %s", exc)
            time.sleep(_POLL_INTERVAL)

    def _repair(self) -> None:
        if self._rebuild_reason is not None and not self._closing:
            self._rebuild()
        if self._retiring:
            self._drain_retired(time.monotonic() + 0.05)
        if self._missing:
            self._ensure_missing()
        if self._retry:
            self._resend()

    def _rebuild(self) -> None:
        epochs = kerr.EpochWatch(self.request_rebuild)
        new = self._new_producer(epochs)
        with self._swap_lock:  # retiring first: pending() counts the old one's messages
            self._retiring.append((self.producer, self._epochs, time.monotonic() + _RETIRE_WAIT))
            old, self.producer = self.producer, new
            old_epochs, self._epochs = self._epochs, epochs
            reason, self._rebuild_reason = self._rebuild_reason, None
        old_epochs.retired = True
        self.rebuilds += 1
        msg = "replaced the Kafka producer (%s); re-sending the %d message(s) it had not delivered"
        logger.warning(msg, reason, len(old))
        self._purge(old)

    @staticmethod
    def _purge(producer: Producer) -> None:
        try:
            producer.purge(in_queue=True, in_flight=True, blocking=False)
        except (KafkaException, RuntimeError) as exc:
            logger.debug("purging a Kafka producer: %s", exc)

    def _drain_retired(self, until: float) -> None:
        """Serve the reports of retired producers (their messages go to ``_retry``)."""
        while self._retiring:
            for entry in list(self._retiring):
                old, _, give_up = entry
                try:
                    old.poll(0)
                except (KafkaException, RuntimeError):
                    pass
                left = len(old)
                if left and time.monotonic() >= give_up:
                    self._record_failure(
                        ",".join(self._limits) or "?", "lost with a failed producer", left
                    )
                    left = 0
                if not left:
                    self._retiring.remove(entry)
            if not self._retiring or time.monotonic() >= until:
                return
            time.sleep(0.005)

    def _ensure_missing(self) -> None:
        now = time.monotonic()
        for name, due in list(self._missing.items()):
            if now < due:
                continue
            self._limits.pop(name, None)
            self._stamps.forget(name)
            self.admin.forget(name)
            try:
                self.admin.ensure_topic(name)
                # The producer marked the topic as missing: refresh its metadata now.
                self.producer.list_topics(name, timeout=self.config.connect_timeout)
            except (MsightError, KafkaException) as exc:
                logger.warning("Kafka topic %r is gone and could not be created: %s", name, exc)
                self._missing[name] = now + _ENSURE_INTERVAL
                continue
            logger.warning("Kafka topic %r disappeared; it exists again, re-sending", name)
            self._missing.pop(name, None)

    def _resend(self) -> None:
        now = time.monotonic()
        # An item leaves the queue only once it is with the producer: pending() counts it.
        for _ in range(len(self._retry)):
            item = self._retry[0]  # callbacks only append: the head stays this item
            if now >= item.deadline:
                self._retry.popleft()
                self._record_failure(item.topic, item.reason)
                continue
            if item.topic in self._missing:
                self._retry.rotate(-1)
                continue
            callback = functools.partial(self._on_delivery_with, item.headers, item.deadline)
            # The same partition keeps a stamped record's place (if the topic still has it).
            part = item.partition
            if not 0 <= part < self._stamps.partitions(item.topic):
                part = -1
            try:
                with self._swap_lock:
                    self.producer.produce(
                        item.topic,
                        item.value,
                        item.key,
                        part,
                        on_delivery=callback,
                        headers=item.headers,
                    )
            except BufferError:
                return  # full: the next round
            except KafkaException as exc:
                err = kerr.fatal_error(exc)
                if err is not None:
                    self.request_rebuild(err.str())
                    return
                if kerr.code_of(exc) in kerr.TOPIC_MISSING:
                    self._missing.setdefault(item.topic, now + _ENSURE_INTERVAL)
                    self._retry.rotate(-1)
                    continue
                self._retry.popleft()
                self._record_failure(item.topic, str(exc))
                continue
            self._retry.popleft()
            self.resent += 1

    # -- caller side ------------------------------------------------------------------

    def raise_failures(self) -> None:
        """Raise (once) for deliveries that failed since the last call."""
        if not self._failed:
            return
        with self._fail_lock:
            failed, self._failed = self._failed, {}
            reasons, self._reasons = self._reasons, {}
        parts = [f"{n} message(s) to topic {t!r} ({reasons.get(t)})" for t, n in failed.items()]
        raise PublishError("Kafka delivery failed: " + "; ".join(parts))

    def limit(self, name: str) -> int:
        """Largest record value sent as one record on ``name`` (learned once)."""
        limit = self._limits.get(name)
        if limit is None:
            with self._learn_lock:
                limit = self._limits.get(name)
                if limit is None:
                    topic_limit, _ = self.admin.ensure_topic(name)
                    limit = min(topic_limit, self.max_record) - RECORD_OVERHEAD
                    self._limits[name] = limit = max(limit, 1024)
        return limit

    def publish(self, name: str, data: bytes, trace: Any = None) -> None:
        # trace: (name, value) pairs of W3C trace context (msight_core.tracing), or None.
        if self._failed:
            self.raise_failures()
        limit = self._limits.get(name) or self.limit(name)
        if len(data) <= limit:
            self._produce(name, data, trace or None)
        else:
            self._publish_chunked(name, data, limit, trace or [])
        self.published += 1

    def _publish_chunked(self, name: str, data: bytes, limit: int, trace: Any = ()) -> None:
        frame_id = self._frame_ids.next()
        # The whole frame under the lock: its chunks are contiguous among this
        # producer's records (the consumer drops a frame whose producer moved on
        # without finishing it) and its seq is in order in its partition.
        with self._swap_lock:
            if self._key is not None:
                where = (self._key, -1)
            else:
                key, part = self._stamps.next(name)
                if key is not None:
                    key = as_frame(key)
                    self._stamps.taken(name)
                where = (key, part)
            for chunk, headers in split(data, limit, frame_id):
                self._produce(name, chunk, headers + list(trace), where)
        self.chunked_frames += 1

    def _produce(
        self, name: str, value: bytes, headers: Any = None, where: tuple[Any, int] | None = None
    ) -> None:
        """Hand a record to librdkafka; ``where``: key and partition of a frame's chunk."""
        callback = None
        if headers is not None:
            callback = functools.partial(self._on_delivery_with, headers, None)
        deadline = 0.0
        while True:
            try:
                with self._swap_lock:
                    if where is not None:
                        key, part = where
                    elif self._key is not None:
                        key, part = self._key, -1
                    else:
                        key, part = self._stamps.next(name)
                    if callback is None:
                        self.producer.produce(name, value, key, part)
                    else:
                        self.producer.produce(
                            name, value, key, part, on_delivery=callback, headers=headers
                        )
                    if where is None and key is not None and self._key is None:
                        self._stamps.taken(name)
                return
            except BufferError:
                why = "buffer full: the broker is unreachable or slower than the publishers"
            except KafkaException as exc:
                err = kerr.fatal_error(exc)
                if err is not None:
                    self.request_rebuild(err.str())  # the report thread replaces it
                    why = "the producer is being replaced"
                elif kerr.code_of(exc) in kerr.TOPIC_MISSING:
                    self._missing.setdefault(name, 0.0)  # the report thread creates it
                    self._stamps.forget(name)
                    why = "the topic is missing and being created again"
                else:
                    raise kerr.translate(exc, f"publishing to {name!r}") from exc
            now = time.monotonic()
            if not deadline:
                deadline = now + self.config.publish.timeout
            elif now >= deadline:
                raise BackpressureError(
                    f"Kafka publish to topic {name!r} waited {self.config.publish.timeout:g}s "
                    f"({len(self.producer)} message(s) waiting): {why}"
                )
            time.sleep(0.005)

    def pending(self) -> int:
        """Messages accepted and not yet delivered or reported."""
        return (
            len(self.producer)
            + len(self._retry)
            + sum(len(old) for old, _, _ in self._retiring)
            + (1 if self._rebuild_reason is not None else 0)
        )

    def _wait(self, wait: float) -> int:
        """Flush for up to ``wait`` seconds, through producer replacements."""
        deadline = time.monotonic() + wait
        while True:
            producer = self.producer
            started = time.monotonic()
            step = max(0.0, min(0.2, deadline - started))
            try:
                producer.flush(step)
            except KafkaException as exc:
                self._poll_failed(exc)
            pending = self.pending()
            now = time.monotonic()
            if not pending or now >= deadline:
                return pending
            if now - started < step / 2:  # the rest is with the report thread
                time.sleep(0.01)

    def flush(self, timeout: float | None) -> None:
        """Wait until everything accepted was delivered (or failed).

        Raises:
            BackpressureError: messages were still waiting after ``timeout``.
            PublishError: a delivery failed.
        """
        wait = self.config.publish.timeout if timeout is None else timeout
        remaining = self._wait(wait)
        self.raise_failures()
        if remaining:
            raise BackpressureError(
                f"Kafka flush timed out after {wait:g}s with {remaining} message(s) "
                "not yet acknowledged by the broker"
            )

    def close(self) -> None:
        """Flush (bounded by the publish timeout), stop the report thread.

        Raises:
            PublishError: messages could not be delivered (they are purged).
        """
        try:
            remaining = self._wait(self.config.publish.timeout)
        finally:
            self._closing = True
            self._stop.set()
            self._thread.join(2.0)
        if remaining:
            logger.warning(
                "closing the Kafka producer with %d message(s) undelivered "
                "(broker unreachable for %gs)",
                remaining,
                self.config.publish.timeout,
            )
        for producer in [self.producer] + [old for old, _, _ in self._retiring]:
            self._purge(producer)
            until = time.monotonic() + 1.0
            while len(producer) and time.monotonic() < until:
                try:
                    producer.poll(0.01)  # purged messages are reported as failures
                except (KafkaException, RuntimeError):
                    time.sleep(0.01)
            left = len(producer)
            if left:
                self._record_failure(",".join(self._limits) or "?", "not delivered", left)
        self._retiring.clear()
        while self._retry:
            item = self._retry.popleft()
            self._record_failure(item.topic, item.reason)
        self.raise_failures()
