"""Kafka helpers (not public API): librdkafka settings, error translation, topics.

Everything that touches confluent-kafka outside the producer and consumer loops
lives here: building the property dicts from :class:`KafkaConfig` (secrets are
revealed only into those dicts), translating ``KafkaError`` codes into the msight
error tree, and :class:`TopicAdmin`, which creates missing topics with the
configured partitions and ``max.message.bytes`` and learns the limit of topics
that already exist.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
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
    "delivery_timeout",
    "producer_conf",
    "translate",
]

logger = logging.getLogger("msight_core.pubsub.kafka")
librdkafka_logger = logging.getLogger("msight_core.pubsub.kafka.librdkafka")


class _RetriedFailuresAreWarnings(logging.Filter):
    """Keep librdkafka's reconnect noise out of the ERROR level and off the logs.

    librdkafka logs each failed broker connection (facility ``FAIL``) as an
    error, though it retries, and other bootstrap servers may be fine; the
    outage itself is reported once through ``error_cb``. The first such line of
    a client in :data:`FAIL_LOG_INTERVAL` seconds is kept as a WARNING, the rest
    only reach DEBUG. ``FATAL`` lines of a producer become warnings too: the
    writer replaces a failed producer and logs what it does about it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if record.levelno <= logging.DEBUG or not isinstance(args, tuple) or len(args) < 2:
            return True
        facility, client = args[0], str(args[1])
        if facility == "FATAL" and "producer" in client:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            return True
        if facility != "FAIL":
            return True
        now = time.monotonic()
        if now - self._last.get(client, -FAIL_LOG_INTERVAL) < FAIL_LOG_INTERVAL:
            if not librdkafka_logger.isEnabledFor(logging.DEBUG):
                return False
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return True
        if len(self._last) > 1000:
            self._last.clear()
        self._last[client] = now
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


#: Seconds between two logged connection failures of one librdkafka client.
FAIL_LOG_INTERVAL = 30.0
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
        # Back at most 1 s after a broker returns (librdkafka default: up to 10 s).
        "reconnect.backoff.max.ms": 1000,
        # Topics are created by TopicAdmin with the configured partitions and
        # max.message.bytes, never by the broker's defaults behind our back.
        "allow.auto.create.topics": False,
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


def delivery_timeout(config: KafkaConfig) -> float:
    """Seconds librdkafka keeps trying an accepted message (``message.timeout.ms``).

    ``KafkaConfig.delivery_timeout`` if set, else 3 x ``PublishConfig.timeout``
    (30 s by default): a message the broker cannot take is reported as a
    :class:`~msight_core.errors.PublishError` after that, not after librdkafka's
    default of 300 s.
    """
    if config.delivery_timeout is not None:
        return config.delivery_timeout
    return min(3 * config.publish.timeout, 2_000_000.0)


def producer_conf(
    config: KafkaConfig, on_delivery: Any, error_cb: Any, stats_cb: Any = None
) -> dict[str, Any]:
    """Idempotent, ``acks=all``, batched producer with a bounded outage buffer.

    ``stats_cb`` (optional) receives librdkafka's statistics 4 times a second;
    the writer uses them to notice a broker that keeps rejecting its producer id.
    """
    biggest = config.max_message_bytes + RECORD_OVERHEAD
    conf = _client_conf(config, error_cb)
    conf.update(
        {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.timeout.ms": max(100, int(delivery_timeout(config) * 1000)),
            # A topic missing from the metadata fails its messages after 1 s (not
            # 30 s): the writer then creates it again and re-sends them.
            "topic.metadata.propagation.max.ms": 1000,
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
    if stats_cb is not None:
        conf["stats_cb"] = stats_cb
        conf["statistics.interval.ms"] = 250
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
    if "heartbeat.interval.ms" not in conf and "session.timeout.ms" in conf:
        # librdkafka's 3 s default is too slow for a short session: a third of it.
        try:
            session = int(conf["session.timeout.ms"])
        except (TypeError, ValueError):
            session = 45_000
        conf["heartbeat.interval.ms"] = max(100, min(3000, session // 3))
    return conf


# --------------------------------------------------------------------------- topics

_limits_lock = threading.Lock()
#: (servers, topic) -> max.message.bytes, shared by every instance in the process.
_known_limits: dict[tuple[tuple[str, ...], str], int] = {}


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
                client.poll(0)  # serve its log lines through librdkafka_logger
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


def unique_group_id() -> str:
    """A consumer group used by one instance only (broadcast subscribers)."""
    return f"msight-solo-{uuid.uuid4().hex}"
