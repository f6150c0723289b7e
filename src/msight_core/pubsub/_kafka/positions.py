"""Where a Kafka consumer starts reading: :func:`start_positions`, :func:`seek_targets`.

Client calls on the consumer's own thread (the subscriber's reader thread).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaException, TopicPartition

__all__ = ["seek_targets", "start_positions"]

logger = logging.getLogger("msight_core.pubsub.kafka")


def start_positions(
    consumer: Consumer,
    parts: list[TopicPartition],
    commit: bool,
    earliest: Callable[[str], bool],
    timeout: float,
) -> list[TopicPartition]:
    """Concrete start offsets: committed (with ``commit``), else the earliest or
    latest offset resolved now (``earliest(topic)`` decides).

    With ``commit`` the resolved offsets are committed at once, so whichever
    member owns a partition later starts from the same place.
    """
    if commit:
        parts = consumer.committed(parts, timeout=timeout)
    else:
        parts = [TopicPartition(p.topic, p.partition) for p in parts]
    missing = [p for p in parts if p.offset < 0]
    if not missing:
        return parts
    query = [TopicPartition(p.topic, p.partition, -2 if earliest(p.topic) else -1) for p in missing]
    try:
        resolved = consumer.offsets_for_times(query, timeout=timeout)
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
    fixed = [TopicPartition(p.topic, p.partition, p.offset) for p in missing if p.offset >= 0]
    if commit and fixed:
        # Later owners of these partitions start here too, so nothing
        # published during a rebalance is skipped by "latest".
        try:
            consumer.commit(offsets=fixed, asynchronous=False)
        except KafkaException as exc:
            logger.warning("could not commit Kafka start offsets: %s", exc)
    return parts


def seek_targets(
    consumer: Consumer, keys: list[tuple[str, int]], where: Any, timeout: float
) -> list[TopicPartition]:
    """Where ``replay(where)`` moves each partition: ``"earliest"``/``"latest"``,
    a timestamp (``float`` seconds) or an ``int`` offset."""
    if isinstance(where, str):
        query = [TopicPartition(t, p, -2 if where == "earliest" else -1) for t, p in keys]
    elif isinstance(where, float):
        query = [TopicPartition(t, p, int(where * 1000)) for t, p in keys]
    else:
        query = [TopicPartition(t, p, int(where)) for t, p in keys]
    if not isinstance(where, int):
        query = consumer.offsets_for_times(query, timeout=timeout)
    return [
        TopicPartition(q.topic, q.partition, q.offset if q.offset >= 0 else OFFSET_END)
        for q in query
    ]
