"""The Kafka publishing side (not public API).

One idempotent, ``acks=all`` librdkafka producer per backend. ``publish()``
only hands the record to librdkafka, which batches (``linger.ms``) and sends in
the background; a daemon thread serves delivery reports. Reports come only for
failures (``delivery.report.only.error``), are counted per topic and raised as
:class:`PublishError` from the next ``publish()``, ``flush()`` or ``close()``.

Frames larger than the topic's ``max.message.bytes`` are split into chunks sent
with one key (so one partition, in order) and a ``msight.chunk`` header; the
consumer side reassembles them. Frames within the limit are plain records whose
value is exactly the published bytes.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from ..config import KafkaConfig
from ..errors import BackpressureError, ConfigError, PublishError
from ._kafka_conf import (
    CHUNK_HEADER,
    CHUNK_STRUCT,
    RECORD_OVERHEAD,
    TopicAdmin,
    producer_conf,
    translate,
)

__all__ = ["KafkaWriter"]

logger = logging.getLogger("msight_core.pubsub.kafka")

_POLL_INTERVAL = 0.1
_FATAL_CODES = {KafkaError._FATAL, KafkaError._FENCED}


class KafkaWriter:
    """Producer, delivery-report thread and the per-topic frame limits."""

    def __init__(self, config: KafkaConfig, admin: TopicAdmin) -> None:
        self.config = config
        self.admin = admin
        self._key = os.urandom(8) if config.ordered else None
        self._frame_prefix = os.urandom(8)
        self._frame_seq = itertools.count()
        self._limits: dict[str, int] = {}
        self._learn_lock = threading.Lock()
        self._chunk_lock = threading.Lock()
        self._fail_lock = threading.Lock()
        self._failed: dict[str, int] = {}
        self._reasons: dict[str, str] = {}
        self._fatal: str | None = None
        self._outage_logged = False
        self._stop = threading.Event()
        try:
            self.producer = Producer(producer_conf(config, self._on_delivery, self._on_error))
        except (KafkaException, ValueError, TypeError) as exc:
            raise ConfigError(f"invalid Kafka producer settings: {exc}") from None
        self.max_record = int(producer_conf(config, None, None)["message.max.bytes"])
        self.published = 0
        self.chunked_frames = 0
        self.failed_total = 0
        self._thread = threading.Thread(target=self._serve, name="msight-kafka-dr", daemon=True)
        self._thread.start()

    # -- callbacks (delivery-report thread) -----------------------------------------

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is None:
            return
        topic = msg.topic() or "?"
        with self._fail_lock:
            self._failed[topic] = self._failed.get(topic, 0) + 1
            self._reasons.setdefault(topic, err.str())
            self.failed_total += 1
            first = self._failed[topic] == 1
        if first:
            logger.error("Kafka delivery to topic %r failed: %s", topic, err.str())

    def _on_error(self, err: Any) -> None:
        if err.code() in _FATAL_CODES or err.fatal():
            self._fatal = err.str()
            logger.error("Kafka producer failed fatally: %s", err.str())
        elif not self._outage_logged:
            self._outage_logged = True
            logger.warning("Kafka producer: %s (buffering and retrying)", err.str())

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                if self.producer.poll(_POLL_INTERVAL) and self._outage_logged:
                    self._outage_logged = False
            except Exception:  # never let a callback error kill the report thread
                logger.exception("Kafka delivery-report thread error")

    # -- caller side ------------------------------------------------------------------

    def raise_failures(self) -> None:
        """Raise (once) for deliveries that failed since the last call."""
        if self._fatal is not None:
            raise PublishError(f"Kafka producer failed fatally: {self._fatal}")
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

    def publish(self, name: str, data: bytes) -> None:
        if self._failed or self._fatal is not None:
            self.raise_failures()
        limit = self._limits.get(name) or self.limit(name)
        if len(data) <= limit:
            self._produce(name, data, self._key, None)
        else:
            self._publish_chunked(name, data, limit)
        self.published += 1

    def _publish_chunked(self, name: str, data: bytes, limit: int) -> None:
        size = limit - CHUNK_STRUCT.size - len(CHUNK_HEADER) - 64
        count = -(-len(data) // size)
        frame_id = self._frame_prefix + next(self._frame_seq).to_bytes(8, "big")
        key = self._key or frame_id
        view = memoryview(data)
        # One frame's chunks stay contiguous among this producer's frames, which
        # lets the consumer drop a frame whose producer moved on without finishing.
        with self._chunk_lock:
            for index in range(count):
                header = CHUNK_STRUCT.pack(frame_id, index, count)
                chunk = bytes(view[index * size : (index + 1) * size])
                self._produce(name, chunk, key, [(CHUNK_HEADER, header)])
        self.chunked_frames += 1

    def _produce(self, name: str, value: bytes, key: Any, headers: Any) -> None:
        try:
            self.producer.produce(name, value, key, headers=headers)
            return
        except BufferError:
            pass
        except KafkaException as exc:
            raise translate(exc, f"publishing to {name!r}") from exc
        timeout = self.config.publish.timeout
        deadline = time.monotonic() + timeout
        while True:
            time.sleep(0.005)
            try:
                self.producer.produce(name, value, key, headers=headers)
                return
            except BufferError:
                if time.monotonic() >= deadline:
                    raise BackpressureError(
                        f"Kafka publish buffer full for {timeout:g}s "
                        f"({len(self.producer)} message(s) waiting; topic {name!r}); "
                        "the broker is unreachable or slower than the publishers"
                    ) from None
            except KafkaException as exc:
                raise translate(exc, f"publishing to {name!r}") from exc

    def flush(self, timeout: float | None) -> None:
        """Wait until everything accepted was delivered (or failed).

        Raises:
            BackpressureError: messages were still waiting after ``timeout``.
            PublishError: a delivery failed.
        """
        wait = self.config.publish.timeout if timeout is None else timeout
        remaining = self.producer.flush(wait)
        self.raise_failures()
        if remaining:
            raise BackpressureError(
                f"Kafka flush timed out after {wait:g}s with {remaining} message(s) "
                "not yet acknowledged by the broker"
            )

    def close(self) -> None:
        """Flush (bounded by the publish timeout), stop the report thread."""
        try:
            remaining = self.producer.flush(self.config.publish.timeout)
            if remaining:
                logger.warning(
                    "closing the Kafka producer with %d message(s) undelivered "
                    "(broker unreachable for %gs)",
                    remaining,
                    self.config.publish.timeout,
                )
                self.producer.purge()
                self.producer.poll(0)
        finally:
            self._stop.set()
            self._thread.join(2.0)
        self.raise_failures()
