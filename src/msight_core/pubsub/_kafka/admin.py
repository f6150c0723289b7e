"""Kafka topics: created on first use, each one's size limit learned once.

:class:`TopicAdmin` creates missing topics with the configured partitions,
replication and ``max.message.bytes``, and reads the limit of topics that
already exist; the limits are cached per process (per servers and topic).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from ...config import KafkaConfig
from ...errors import BrokerUnavailableError, ConfigError
from .errors import code_of, translate
from .settings import admin_conf

__all__ = ["KAFKA_DEFAULT_MAX_MESSAGE_BYTES", "TopicAdmin", "partition_count"]

logger = logging.getLogger("msight_core.pubsub.kafka")

#: Kafka's broker default ``message.max.bytes`` (topics without an override).
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1048588

_limits_lock = threading.Lock()
#: (servers, topic) -> max.message.bytes, shared by every instance in the process.
_known_limits: dict[tuple[tuple[str, ...], str], int] = {}


def partition_count(client: Any, name: str, timeout: float) -> int:
    """Partitions of ``name`` as ``client`` (a producer, consumer or admin client)
    sees them; 0 if it does not exist or the broker did not answer."""
    try:
        metadata = client.list_topics(name, timeout=timeout)
    except KafkaException as exc:
        logger.debug("Kafka partitions of %r unknown (%s)", name, exc)
        return 0
    topic = metadata.topics.get(name)
    return len(topic.partitions) if topic is not None and topic.error is None else 0


class TopicAdmin:
    """Creates missing topics and learns each topic's ``max.message.bytes``.

    Thread-safe. Every call is bounded by ``config.connect_timeout``. Each call
    uses its own short-lived ``AdminClient``, released (after its log lines
    were served) when the call returns: an idle client kept open would
    reconnect through every outage and queue log lines that nobody serves.
    """

    def __init__(self, config: KafkaConfig) -> None:
        self.config = config

    @contextlib.contextmanager
    def _connected(self) -> Iterator[AdminClient]:
        try:
            client = AdminClient(admin_conf(self.config))
        except (KafkaException, ValueError, TypeError) as exc:
            raise ConfigError(f"invalid Kafka client settings: {exc}") from None
        try:
            yield client
        finally:
            try:
                client.poll(0)  # serve its log lines through the librdkafka logger
            except (KafkaException, RuntimeError):
                pass

    def ensure_topic(self, name: str) -> tuple[int, bool]:
        """Make sure ``name`` exists; return ``(max.message.bytes, created_now)``.

        Raises:
            BrokerUnavailableError: the broker did not answer in time.
            AuthenticationError: credentials or ACLs refused.
            BrokerError: the broker refused the creation for another reason.
        """
        key = (self.config.servers, name)
        with _limits_lock:
            known = _known_limits.get(key)
        if known is not None:
            return known, False
        timeout = self.config.connect_timeout
        with self._connected() as client:
            try:
                metadata = client.list_topics(timeout=timeout)
            except KafkaException as exc:
                where = ",".join(self.config.servers)
                raise translate(exc, f"reaching the broker at {where}") from exc
            topic = metadata.topics.get(name)
            created = False
            if topic is None or topic.error is not None or not topic.partitions:
                created = self._create(client, name, timeout)
            limit = self.config.max_message_bytes if created else self._describe(client, name)
        with _limits_lock:
            _known_limits[key] = limit
        return limit, created

    def forget(self, name: str) -> None:
        """Drop what is known about ``name`` (it disappeared): the next
        :meth:`ensure_topic` checks the broker again and re-creates it."""
        with _limits_lock:
            _known_limits.pop((self.config.servers, name), None)

    def partitions(self, name: str) -> int:
        """Partition count of ``name`` (0 if it does not exist)."""
        with self._connected() as client:
            return self._partitions(client, name)

    def _partitions(self, client: AdminClient, name: str) -> int:
        try:
            metadata = client.list_topics(name, timeout=self.config.connect_timeout)
        except KafkaException as exc:
            raise translate(exc, f"reading metadata of {name!r}") from exc
        topic = metadata.topics.get(name)
        if topic is None or topic.error is not None:
            return 0
        return len(topic.partitions)

    def _create(self, client: AdminClient, name: str, timeout: float) -> bool:
        new = NewTopic(
            name,
            num_partitions=self.config.num_partitions,
            replication_factor=self.config.replication_factor,
            config={"max.message.bytes": str(self.config.max_message_bytes)},
        )
        futures = client.create_topics([new], operation_timeout=timeout, request_timeout=timeout)
        try:
            futures[name].result(timeout + 1)
        except KafkaException as exc:
            if code_of(exc) == KafkaError.TOPIC_ALREADY_EXISTS:
                return False
            raise translate(exc, f"creating topic {name!r}") from exc
        except TimeoutError:
            raise BrokerUnavailableError(
                f"Kafka: creating topic {name!r} got no answer within {timeout:g}s"
            ) from None
        logger.info(
            "created Kafka topic %r: %d partition(s), max.message.bytes=%d",
            name,
            self.config.num_partitions,
            self.config.max_message_bytes,
        )
        # The new topic's metadata can lag a moment on some brokers.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._partitions(client, name):
            time.sleep(0.05)
        return True

    def _describe(self, client: AdminClient, name: str) -> int:
        timeout = self.config.connect_timeout
        resource = ConfigResource("topic", name)
        try:
            futures = client.describe_configs([resource], request_timeout=timeout)
            entries = futures[resource].result(timeout + 1)
        except (KafkaException, TimeoutError) as exc:
            logger.warning(
                "could not read max.message.bytes of Kafka topic %r (%s); assuming the "
                "broker default %d and splitting larger frames",
                name,
                exc,
                KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
            )
            return KAFKA_DEFAULT_MAX_MESSAGE_BYTES
        entry = entries.get("max.message.bytes")
        value = getattr(entry, "value", None)
        try:
            return int(value) if value is not None else KAFKA_DEFAULT_MAX_MESSAGE_BYTES
        except ValueError:
            return KAFKA_DEFAULT_MAX_MESSAGE_BYTES
