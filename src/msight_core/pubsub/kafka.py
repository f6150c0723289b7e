"""Kafka backend: durable, at-least-once, consumer groups (confluent-kafka).

``KafkaPubSub(get_kafka_config(group_id=...))`` as in the seeds.

Publishing
    An idempotent ``acks=all`` producer; ``publish()`` hands the record to
    librdkafka, which batches and sends in the background (no flush per
    message). A failed delivery raises :class:`~msight_core.errors.PublishError`
    (naming the topic) from a later ``publish()``, ``flush()`` or ``close()``.
    While the broker is unreachable, librdkafka buffers up to
    ``PublishConfig.buffer_bytes``; then ``publish()`` waits up to
    ``PublishConfig.timeout`` and raises ``BackpressureError``. A message not
    delivered within ``KafkaConfig.delivery_timeout`` (default 3 x the publish
    timeout) is reported as ``PublishError``. A producer that failed for good
    (the broker lost its idempotence state) is replaced and what it had not
    delivered is re-sent; a topic that vanished is created again.

Topics
    Missing topics are created on first use with ``num_partitions`` partitions
    and ``max.message.bytes = max_message_bytes`` (64 MiB by default), so large
    frames travel as single records. For topics that exist with a smaller limit
    (1 MB is the Kafka default) larger frames are split into chunks sent to one
    partition in order, and reassembled by msight subscribers. Frames within the
    limit are plain records: their value is exactly the published bytes.

Ordering
    Every subscriber gets each publisher's messages in publish order, and a
    group balances even a single publisher's stream: each message takes the
    publisher's next sequence number and the next partition in turn (the record
    key carries the stamp; the value is exactly the published bytes), and the
    subscriber restores each publisher's order among the partitions it owns
    (all of them, or its share in a group). A message is held back only while
    an earlier one of its publisher may still come, at most
    ``KafkaConfig.order_wait`` seconds (2 by default) and within the receive
    queue's bounds; one that never comes is counted (``stats()["order_gaps"]``).
    A subscriber that starts while a publisher is sending holds that
    publisher's first messages at most 0.25 s for what may precede them
    (``order_wait`` if the publisher itself has just started).
    Order is not kept across a rebalance for what a previous owner left
    unprocessed, nor for records of other (raw) producers, which pass through
    as they come. With ``KafkaConfig.ordered`` (``MSIGHT_KAFKA_ORDERED=true``)
    each publisher instance uses one partition instead: order for any Kafka
    consumer, raw ones included, and balance across publishers only.

Subscribing
    With a ``group_id`` the members share partitions (each message to one
    member); without one every instance gets every message. ``subscribe()``
    returns once partitions are assigned and positioned, so messages published
    afterwards are delivered. An offset is committed only after the application
    has taken the message from ``listen()`` and come back for the next one
    (and on ``close()``), so a crashed subscriber gets the unprocessed messages
    again, and when partitions move to another member (one leaves or joins)
    the new owner starts where the group's processing ended: no gap, possibly
    duplicates (what the old owner fetched but did not process). A full
    receive queue pauses the partitions instead of dropping: the configured
    overflow policy is not used (Kafka keeps the backlog).

Wildcards
    ``subscribe("camera1.*")`` / ``subscribe("camera1.>")`` follow every
    matching topic (whole tokens, as on NATS): a group member through a Kafka
    regex subscription, a subscriber without a group by listing the cluster's
    topics. A topic created later is picked up at the next metadata refresh
    (2 s, ``topic.metadata.refresh.interval.ms``; plus a rebalance for a group
    member) and read from its first message. Each message's ``topic`` is the
    topic it was published to.

This module is the public facade; the machinery is in the private package
``msight_core.pubsub._kafka`` (settings, errors, admin, chunks, stamps,
order, inbox, patterns, positions, publisher, subscriber).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from typing import Any

from ..config import KafkaConfig, OverflowPolicy, load_kafka_config
from ..errors import ConfigError, MsightError
from ..tracing import outgoing
from ._core import Delivery, QueueBackend
from ._kafka.admin import TopicAdmin
from ._kafka.errors import translate
from ._kafka.publisher import Publisher
from ._kafka.subscriber import Subscriber
from .base import Capabilities

__all__ = ["KafkaPubSub"]

logger = logging.getLogger(__name__)


class KafkaPubSub(QueueBackend):
    """Kafka pub/sub: persistent, at-least-once, consumer groups.

    Args:
        config: settings; ``None`` reads ``MSIGHT_KAFKA_*`` from the environment.

    No connection is made until the first ``subscribe()`` or ``publish()``.
    ``publish()`` is thread-safe; ``listen()``/``receive()`` serve one thread.

    Raises:
        ConfigError: a librdkafka property in the config is invalid.
    """

    capabilities = Capabilities(
        broadcast=True, groups=True, persistent=True, ordered=True, max_payload=None, patterns=True
    )

    def __init__(self, config: KafkaConfig | None = None) -> None:
        if config is None:
            config = load_kafka_config()
        if not isinstance(config, KafkaConfig):
            raise TypeError(f"config must be a KafkaConfig, got {type(config).__name__}")
        # Kafka keeps the backlog: a full queue pauses fetching instead of dropping.
        queue = dataclasses.replace(config.queue, overflow=OverflowPolicy.BLOCK)
        super().__init__(queue)
        self.config = config
        self._admin = TopicAdmin(config)
        self._publisher: Publisher | None = None
        self._subscriber: Subscriber | None = None
        # The subscriber's, once it exists: processed tokens, partition generations.
        self._acks: dict[tuple[str, int], Any] = {}
        self._generations: dict[tuple[str, int], int] = {}

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        group = f" group={self.config.group_id!r}" if self.config.group_id else ""
        servers = ",".join(self.config.servers)
        return f"<KafkaPubSub {servers}{group} {state} topics={list(self.topics)}>"

    # -- QueueBackend -------------------------------------------------------------------

    def _subscribe(self, name: str) -> None:
        try:
            try:
                _, created = self._admin.ensure_topic(name)
            except MsightError as exc:
                if not isinstance(exc, ConfigError) and "creating topic" in str(exc):
                    # Not allowed to create it: wait for it to appear instead.
                    logger.warning("%s; waiting for the topic to appear", exc)
                    created = True
                else:
                    raise
            if self._subscriber is None:
                self._start_subscriber()
            self._subscriber.subscribe(name, created)
        except MsightError:
            raise
        except Exception as exc:
            raise translate(exc, f"subscribing to {name!r}") from exc

    def _subscribe_pattern(self, pattern: str) -> None:
        try:
            if self._subscriber is None:
                self._start_subscriber()
            self._subscriber.subscribe_pattern(pattern)
        except MsightError:
            raise
        except Exception as exc:
            raise translate(exc, f"subscribing to {pattern!r}") from exc

    def _start_subscriber(self) -> None:
        self._subscriber = subscriber = Subscriber(self.config, self._queue)
        self._acks = subscriber.acks
        self._generations = subscriber.generations
        self._pull = subscriber.pull  # listen() fetches on its own thread when it can

    def _publish(self, name: str, data: bytes) -> None:
        publisher = self._publisher
        if publisher is None:
            publisher = self._make_publisher()
        trace = outgoing()  # W3C trace context as record headers, when tracing is on
        publisher.publish(name, data, list(trace.items()) if trace else None)

    def _make_publisher(self) -> Publisher:
        with self._state_lock:
            if self._publisher is None:
                self._publisher = Publisher(self.config, self._admin)
            return self._publisher

    def _flush(self, timeout: float | None) -> None:
        if self._publisher is not None:
            self._publisher.flush(timeout)

    def _ack(self, delivery: Delivery) -> None:
        # Only a group member's deliveries carry tokens, so its subscriber exists.
        token = delivery[2]  # deliveries are read by index: Kafka queues plain tuples
        self._acks[(delivery[0], token[0])] = token

    def _accept(self, delivery: Delivery) -> bool:
        # A message of a partition revoked or rewound since it was queued is not
        # handed out: the partition's new owner (or new position) delivers it again.
        token = delivery[2]
        return self._generations.get((delivery[0], token[0])) == token[2]

    def _close(self) -> None:
        try:
            if self._publisher is not None:
                self._publisher.close()
        finally:
            if self._subscriber is not None:
                self._subscriber.close()

    # -- Kafka extras -------------------------------------------------------------------

    def replay(self, topic: Any, start: str | float | datetime.datetime) -> int:
        """Move this instance's partitions of ``topic`` to a new position.

        Args:
            topic: a subscribed topic (``Topic`` or name).
            start: ``"earliest"``, ``"latest"``, an ``int`` offset (the same in
                every assigned partition), or a timestamp (``float`` seconds since
                the epoch or an aware ``datetime``): the first message at or after it.

        Returns:
            The number of partitions moved (0 if none of the topic is assigned here).

        With a ``group_id``, messages of the old position still queued locally
        are discarded; without one they are delivered first. Blocks for one
        broker round trip.

        Raises:
            ConfigError: ``start`` is not one of the accepted forms.
            RuntimeError: ``topic`` is not subscribed.
            BrokerUnavailableError: the broker did not answer.
        """
        name = self._name(topic)
        self._check_open()
        if name not in self.topics or self._subscriber is None:
            raise RuntimeError(f"replay({name!r}): subscribe to the topic first")
        if isinstance(start, datetime.datetime):
            if start.tzinfo is None:
                raise ConfigError("replay(): use a timezone-aware datetime")
            start = start.timestamp()
        if isinstance(start, bool) or not isinstance(start, (str, int, float)):
            raise ConfigError(f"replay(): unsupported start {type(start).__name__}")
        if isinstance(start, str) and start not in ("earliest", "latest"):
            raise ConfigError("replay(): start must be 'earliest', 'latest', an offset or a time")
        if isinstance(start, int) and start < 0:
            raise ConfigError("replay(): an offset must be >= 0")
        try:
            return self._subscriber.replay(name, start)
        except MsightError:
            raise
        except Exception as exc:
            raise translate(exc, f"replaying {name!r}") from exc

    def stats(self) -> dict[str, Any]:
        """Counters: delivered/queued (base), published, delivery failures, frames,
        producers replaced after a fatal error and messages re-sent by them; for
        subscribers, rebalances, split frames dropped, and order restoration:
        ``order_gaps`` (a publisher's messages never received), ``order_late``
        (received after later ones were delivered), ``unordered`` (stamps that
        did not add up, passed through), ``fetch_rereads`` (fetches that skipped
        records in a partition, read again) and ``fetch_offsets_skipped`` (offsets
        missing on a second read too: control records, compaction; see
        :mod:`._kafka.holes`)."""
        out = super().stats()
        publisher, subscriber = self._publisher, self._subscriber
        if publisher is not None:
            out.update(
                published=publisher.published,
                chunked_frames_sent=publisher.chunked_frames,
                delivery_failures=publisher.failed_total,
                producer_rebuilds=publisher.rebuilds,
                resent=publisher.resent,
            )
        if subscriber is not None:
            out.update(
                rebalances=subscriber.rebalances,
                incomplete_frames_dropped=subscriber.incomplete_frames_dropped,
                **subscriber.order_stats(),
            )
        return out
