"""What a Kafka group member commits: :class:`Commits`.

Only offsets of messages the application processed are committed. The backend
writes the token of the last processed delivery per partition into
:attr:`Commits.acks` (any thread; one dict store); whichever thread drives the
consumer (:mod:`.._turns`) turns them into offsets and commits them: every
second, on revocation and on close.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from confluent_kafka import Consumer, KafkaException, TopicPartition

from .errors import translate

__all__ = ["Commits"]

logger = logging.getLogger("msight_core.pubsub.kafka")

TP = tuple  # (topic, partition)


class Commits:
    """Processed tokens to committed offsets, for ``consumer``.

    Args:
        consumer: the group member's consumer.
        gens: its partition -> generation map (read only here): a token of a
            partition revoked or rewound since counts for nothing.
    """

    def __init__(self, consumer: Consumer, gens: dict[TP, int]) -> None:
        self.consumer = consumer
        self.gens = gens
        self.acks: dict[TP, tuple[int, int, int]] = {}
        """The token of the last processed delivery per partition (written by the backend)."""
        self.acked: dict[TP, int] = {}  # offsets to commit
        self.committed: dict[TP, int] = {}
        self.last = time.monotonic()  # when the last commit was made

    def take_acks(self) -> None:
        """Turn the acknowledged tokens into offsets to commit."""
        gens, acked, committed = self.gens, self.acked, self.committed
        for key, (_, offset, gen) in self.acks.copy().items():  # one C call: atomic
            if gens.get(key) == gen and offset > committed.get(key, -1):
                acked[key] = committed[key] = offset

    def commit(self, asynchronous: bool, only: set[TP] | None = None) -> None:
        """Commit what was processed (of the partitions ``only``, if given)."""
        self.last = time.monotonic()
        self.take_acks()
        if only is None:
            acked, self.acked = self.acked, {}
        else:
            acked = {k: self.acked.pop(k) for k in only if k in self.acked}
        offsets = [TopicPartition(t, p, o) for (t, p), o in acked.items() if (t, p) in self.gens]
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=offsets, asynchronous=asynchronous)
        except (KafkaException, RuntimeError) as exc:
            err = translate(exc, "committing offsets")
            logger.warning("%s; the messages may be delivered again", err)

    def forget(self, keys: Iterable[TP]) -> None:
        """Partitions no longer ours: nothing of theirs is committed from here."""
        for key in keys:
            self.acked.pop(key, None)
            self.committed.pop(key, None)
            self.acks.pop(key, None)

    def final(self, topic: str | None, timeout: float) -> None:
        """On close: commit what was processed, unless no broker answers a metadata
        request (about ``topic``) within ``timeout`` s: a commit would then wait
        ~6 s for a coordinator that is not there."""
        self.take_acks()
        if not self.acked:
            return
        try:
            self.consumer.list_topics(topic, timeout=timeout)
        except (KafkaException, RuntimeError):
            logger.warning(
                "Kafka broker unreachable on close: the offsets of %d partition(s) "
                "were not committed; their processed messages will come again",
                len(self.acked),
            )
            self.acked.clear()
            return
        self.commit(asynchronous=False)
