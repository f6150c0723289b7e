"""Kafka helpers (not public API): librdkafka settings, error translation, topics.

Everything that touches confluent-kafka outside the producer and consumer loops
lives here: building the property dicts from :class:`KafkaConfig` (secrets are
revealed only into those dicts), translating ``KafkaError`` codes into the msight
error tree, and :class:`TopicAdmin`, which creates missing topics with the
configured partitions and ``max.message.bytes`` and learns the limit of topics
that already exist.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

try:
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    from ..errors import MissingDependencyError

    raise MissingDependencyError("confluent-kafka", "kafka") from exc

from ..config import KafkaConfig, Secret
from ..errors import (
    AuthenticationError,
    BrokerError,
    BrokerUnavailableError,
    ConfigError,
    MsightError,
    PayloadTooLargeError,
)

__all__ = [
    "CHUNK_HEADER",
    "CHUNK_STRUCT",
    "KAFKA_DEFAULT_MAX_MESSAGE_BYTES",
    "RECORD_OVERHEAD",
    "TopicAdmin",
    "admin_conf",
    "consumer_conf",
    "producer_conf",
    "translate",
]

logger = logging.getLogger("msight_core.pubsub.kafka")
librdkafka_logger = logging.getLogger("msight_core.pubsub.kafka.librdkafka")


class _RetriedFailuresAreWarnings(logging.Filter):
    """librdkafka logs each failed broker connection (facility ``FAIL``) as an error,
    though it retries, and other bootstrap servers may be fine; the outage itself
    is reported once through ``error_cb``. Keep those lines at WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.WARNING and record.args and record.args[0] == "FAIL":
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


librdkafka_logger.addFilter(_RetriedFailuresAreWarnings())

MiB = 1024 * 1024
#: Header carried by each piece of a frame split to fit a topic's limit.
CHUNK_HEADER = "msight.chunk"
#: frame id (16 bytes), chunk index, chunk count.
CHUNK_STRUCT = struct.Struct(">16sII")
#: Room left in each record for the record batch framing, key and headers.
RECORD_OVERHEAD = 4096
#: Kafka's broker default ``message.max.bytes`` (topics without an override).
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1048588

_UNAVAILABLE = {
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._TIMED_OUT,
    KafkaError._RESOLVE,
    KafkaError._DESTROY,
    KafkaError.BROKER_NOT_AVAILABLE,
    KafkaError.NETWORK_EXCEPTION,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
}
_AUTH = {
    KafkaError._AUTHENTICATION,
    KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
}
_TOO_LARGE = {KafkaError.MSG_SIZE_TOO_LARGE}


def _error_of(exc: BaseException) -> Any:
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return exc.args[0]
    return exc if isinstance(exc, KafkaError) else None


def translate(exc: BaseException, what: str) -> MsightError:
    """The msight error for a confluent-kafka exception or ``KafkaError``.

    ``what`` says what was being done (``"subscribing to 'cam'"``); the result
    carries the librdkafka reason, which never contains credentials.
    """
    if isinstance(exc, MsightError):
        return exc
    err = _error_of(exc)
    if err is None:
        return BrokerError(f"Kafka: {what} failed: {type(exc).__name__}: {exc}")
    code = err.code()
    text = f"Kafka: {what} failed: {err.str()}"
    if code in _AUTH:
        return AuthenticationError(text)
    if code in _UNAVAILABLE:
        return BrokerUnavailableError(text)
    if code in _TOO_LARGE:
        return PayloadTooLargeError(text)
    if code in (KafkaError._INVALID_ARG, KafkaError.INVALID_CONFIG):
        return ConfigError(text)
    return BrokerError(text)


# --------------------------------------------------------------------------- settings


def _revealed(props: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.reveal() if isinstance(v, Secret) else v) for k, v in props.items()}


def _client_conf(config: KafkaConfig, error_cb: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "bootstrap.servers": ",".join(config.servers),
        "logger": librdkafka_logger,
        "socket.connection.setup.timeout.ms": max(1000, int(config.connect_timeout * 1000)),
    }
    if error_cb is not None:
        conf["error_cb"] = error_cb
    if config.sasl_mechanism:
        conf["security.protocol"] = "SASL_SSL" if config.use_tls else "SASL_PLAINTEXT"
        conf["sasl.mechanism"] = config.sasl_mechanism
        if config.sasl_username is not None:
            conf["sasl.username"] = config.sasl_username
        if config.sasl_password is not None:
            conf["sasl.password"] = config.sasl_password.reveal()
    elif config.use_tls:
        conf["security.protocol"] = "SSL"
    if config.tls_ca_cert_file:
        conf["ssl.ca.location"] = config.tls_ca_cert_file
    conf.update(_revealed(config.client))
    return conf


def admin_conf(config: KafkaConfig) -> dict[str, Any]:
    """Properties of the AdminClient (topic creation and limits)."""
    return _client_conf(config, None)


def producer_conf(config: KafkaConfig, on_delivery: Any, error_cb: Any) -> dict[str, Any]:
    """Idempotent, ``acks=all``, batched producer with a bounded outage buffer."""
    biggest = config.max_message_bytes + RECORD_OVERHEAD
    conf = _client_conf(config, error_cb)
    conf.update(
        {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.max.bytes": min(max(1_000_000, biggest), 1_000_000_000),
            # librdkafka's own bound is the outage buffer; one maximal frame always fits.
            "queue.buffering.max.kbytes": max(
                1, min(max(config.publish.buffer_bytes, biggest + MiB) // 1024, 2**31 - 1)
            ),
            "queue.buffering.max.messages": 1_000_000,
            "delivery.report.only.error": True,
            "on_delivery": on_delivery,
        }
    )
    if not config.ordered:
        # Every message picks a partition on its own, so one publisher's burst is
        # balanced across a group (sticky batching would send it all to one member).
        conf["sticky.partitioning.linger.ms"] = 0
    conf.update(_revealed(config.producer))
    return conf


def consumer_conf(config: KafkaConfig, group_id: str, error_cb: Any) -> dict[str, Any]:
    """Manual-commit consumer able to fetch the largest frame the config allows."""
    fetch_max = max(52_428_800, config.max_message_bytes + MiB)
    conf = _client_conf(config, error_cb)
    conf.update(
        {
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": config.start,
            "enable.partition.eof": False,
            "fetch.max.bytes": fetch_max,
            "receive.message.max.bytes": min(fetch_max + 2 * MiB, 2_147_483_647),
            "fetch.wait.max.ms": 100,
            "topic.metadata.refresh.interval.ms": 5000,
        }
    )
    conf.update(_revealed(config.consumer))
    return conf


# --------------------------------------------------------------------------- topics

_limits_lock = threading.Lock()
#: (servers, topic) -> max.message.bytes, shared by every instance in the process.
_known_limits: dict[tuple[tuple[str, ...], str], int] = {}


class TopicAdmin:
    """Creates missing topics and learns each topic's ``max.message.bytes``.

    Thread-safe. Every call is bounded by ``config.connect_timeout``.
    """

    def __init__(self, config: KafkaConfig) -> None:
        self.config = config
        self._client: AdminClient | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> AdminClient:
        with self._lock:
            if self._client is None:
                try:
                    self._client = AdminClient(admin_conf(self.config))
                except (KafkaException, ValueError, TypeError) as exc:
                    raise ConfigError(f"invalid Kafka client settings: {exc}") from None
            return self._client

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
        client = self.client
        try:
            metadata = client.list_topics(timeout=timeout)
        except KafkaException as exc:
            raise translate(exc, f"reaching the broker at {','.join(self.config.servers)}") from exc
        topic = metadata.topics.get(name)
        created = False
        if topic is None or topic.error is not None or not topic.partitions:
            created = self._create(name, timeout)
        limit = self.config.max_message_bytes if created else self._describe(name, timeout)
        with _limits_lock:
            _known_limits[key] = limit
        return limit, created

    def partitions(self, name: str) -> int:
        """Partition count of ``name`` (0 if it does not exist)."""
        try:
            metadata = self.client.list_topics(name, timeout=self.config.connect_timeout)
        except KafkaException as exc:
            raise translate(exc, f"reading metadata of {name!r}") from exc
        topic = metadata.topics.get(name)
        if topic is None or topic.error is not None:
            return 0
        return len(topic.partitions)

    def _create(self, name: str, timeout: float) -> bool:
        new = NewTopic(
            name,
            num_partitions=self.config.num_partitions,
            replication_factor=self.config.replication_factor,
            config={"max.message.bytes": str(self.config.max_message_bytes)},
        )
        futures = self.client.create_topics(
            [new], operation_timeout=timeout, request_timeout=timeout
        )
        try:
            futures[name].result(timeout + 1)
        except KafkaException as exc:
            err = _error_of(exc)
            if err is not None and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
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
        while time.monotonic() < deadline and not self.partitions(name):
            time.sleep(0.05)
        return True

    def _describe(self, name: str, timeout: float) -> int:
        resource = ConfigResource("topic", name)
        try:
            entries = self.client.describe_configs([resource], request_timeout=timeout)[
                resource
            ].result(timeout + 1)
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


def unique_group_id() -> str:
    """A consumer group used by one instance only (broadcast subscribers)."""
    return f"msight-solo-{uuid.uuid4().hex}"
