"""The Kafka backend's machinery (private: only ``pubsub/kafka.py`` and tests import it).

Built on confluent-kafka (librdkafka); importing this package without it raises
:class:`~msight_core.errors.MissingDependencyError` with the install hint.

``settings``
    librdkafka property dicts for producer, consumer and admin clients (built on
    :func:`msight_core.config.kafka_client_conf`), the delivery timeout, consumer
    group ids, and the filter that keeps librdkafka's reconnect noise off ERROR.
``errors``
    :func:`~.errors.translate`: ``KafkaError``/``KafkaException`` to the msight
    error tree, once, at the backend's boundary.
``errors``
    also :class:`~.errors.EpochWatch`, which notices a broker that keeps
    rejecting the producer's id.
``admin``
    :class:`~.admin.TopicAdmin`: creates missing topics, learns each topic's
    ``max.message.bytes``; :func:`~.admin.partition_count`.
``chunks``
    The wire format of frames split to fit a topic's limit (``msight.chunk``
    header), the splitter and the bounded :class:`~.chunks.Reassembler`.
``stamps``
    The sequence stamp in each record's key (a split frame's chunks share one,
    with its own magic) and the publisher's :class:`~.stamps.Stamper` (seq and
    partition rotation per topic).
``order``
    The subscriber's :class:`~.order.Sequencer`: each publisher's order
    restored among the partitions owned here (bounded hold-back).
``publisher``
    :class:`~.publisher.Publisher`: the producer, its delivery-report thread and
    recovery (replaced producers, vanished topics).
``inbox``
    :class:`~.inbox.Inbox`: fetched records to deliveries (reassembly, order,
    commit-safe tokens), on the consumer thread.
``patterns``
    Wildcard subscriptions: :func:`~.patterns.kafka_regex` (a Kafka regex with
    msight's token semantics) and :class:`~.patterns.Patterns`.
``positions``
    Where a consumer starts: committed, earliest or latest offsets; replay targets.
``subscriber``
    :class:`~.subscriber.Subscriber`: the consumer thread feeding the receive
    queue, assignment, pausing, offsets committed only for processed messages.

Nothing here touches a private attribute of confluent-kafka, so there is no
``internals.py``. (``KafkaError._TRANSPORT`` and its kin are librdkafka's local
error codes, public constants despite the underscore.)
"""

from __future__ import annotations

try:
    import confluent_kafka  # noqa: F401 - fail here, with the hint, before any submodule
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    from ...errors import MissingDependencyError

    raise MissingDependencyError("confluent-kafka", "kafka") from exc
