"""Configuration: the only module that reads ``os.environ``.

Each backend gets a frozen dataclass built from the ``MSIGHT_*`` variables the
original msight-core uses (plus a few of ours, documented on each field). Every
loader takes an optional ``env`` mapping so tests and tools can pass their own,
and keyword overrides so code can build a config without touching the
environment at all.

Secrets are wrapped in :class:`Secret`, whose ``repr()``/``str()`` is ``***``;
only the backend that hands them to its client calls :meth:`Secret.reveal`.
Server lists accept the seed's Python-list form ``"['nats://localhost:4222']"``
as well as plain comma-separated values; they are parsed, never evaluated.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

from .errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "KafkaConfig",
    "MetricsConfig",
    "NatsConfig",
    "OverflowPolicy",
    "PublishConfig",
    "QueueConfig",
    "RedisConfig",
    "Secret",
    "ShmConfig",
    "backend_name",
    "environment",
    "kafka_client_conf",
    "load_kafka_config",
    "load_metrics_config",
    "load_nats_config",
    "load_publish_config",
    "load_queue_config",
    "load_redis_config",
    "load_shm_config",
    "mask_url",
    "masked",
    "nats_connect_options",
    "parse_bool",
    "parse_redis_node",
    "parse_server_list",
]

#: Valid values of ``MSIGHT_PUBSUB_BACKEND``.
BACKENDS: tuple[str, ...] = ("redis", "nats", "kafka", "memory", "shm")

MiB = 1024 * 1024

_T = TypeVar("_T")


class Secret:
    """A credential whose text never shows in ``repr()``, ``str()`` or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret value must be a str")
        self._value = value

    def reveal(self) -> str:
        """Return the secret text; call only where it is handed to a client."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __reduce__(self) -> Any:  # keep secrets out of pickles too
        raise TypeError("Secret values cannot be pickled")


class _MaskedRepr:
    """``repr()`` of a config dataclass with every value passed through :func:`masked`."""

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{f.name}={masked(getattr(self, f.name))!r}"
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if f.repr
        )
        return f"{type(self).__name__}({fields})"


class OverflowPolicy(str, Enum):
    """What a subscriber's receive queue does when its bound is reached."""

    DROP_OLDEST = "drop_oldest"
    """Discard the oldest queued message (freshest data wins: the sensor default)."""
    DROP_NEWEST = "drop_newest"
    """Discard the message that just arrived."""
    BLOCK = "block"
    """Stop reading from the broker until the application catches up (backpressure).
    On Redis this eventually makes the server disconnect the subscriber."""


@dataclass(frozen=True)
class QueueConfig:
    """Bound on what a subscriber holds between the broker and ``listen()``.

    Env: ``MSIGHT_QUEUE_MAX_MESSAGES``, ``MSIGHT_QUEUE_MAX_BYTES``, ``MSIGHT_QUEUE_OVERFLOW``.
    """

    max_messages: int = 100_000
    max_bytes: int = 512 * MiB
    overflow: OverflowPolicy = OverflowPolicy.DROP_OLDEST

    def __post_init__(self) -> None:
        if self.max_messages < 1:
            raise ConfigError("queue max_messages must be >= 1")
        if self.max_bytes < 1:
            raise ConfigError("queue max_bytes must be >= 1")
        object.__setattr__(self, "overflow", OverflowPolicy(self.overflow))


@dataclass(frozen=True)
class PublishConfig:
    """Bound on what ``publish()`` buffers while the broker is unreachable.

    Env: ``MSIGHT_PUBLISH_BUFFER_BYTES`` (default 64 MiB) and
    ``MSIGHT_PUBLISH_TIMEOUT`` (seconds ``publish()``/``flush()`` may wait for room
    or for the broker before raising :class:`~msight_core.errors.BackpressureError`).
    """

    buffer_bytes: int = 64 * MiB
    timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.buffer_bytes < 1:
            raise ConfigError("publish buffer_bytes must be >= 1")
        if not self.timeout > 0:
            raise ConfigError("publish timeout must be > 0")


@dataclass(frozen=True, repr=False)
class RedisConfig(_MaskedRepr):
    """Redis connection settings (``MSIGHT_REDIS_MESSAGE_BROKER_*``)."""

    host: str = "localhost"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: Secret | None = None
    use_tls: bool = False
    tls_ca_cert_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_verify: bool = True
    use_cluster: bool = False
    cluster_nodes: tuple[str, ...] = ()
    connect_timeout: float = 5.0
    queue: QueueConfig = field(default_factory=QueueConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)

    def __post_init__(self) -> None:
        _check_port("port", self.port)
        if self.db < 0:
            raise ConfigError("Redis db must be >= 0")


@dataclass(frozen=True, repr=False)
class NatsConfig(_MaskedRepr):
    """NATS connection settings (``MSIGHT_NATS_*``)."""

    servers: tuple[str, ...] = ("nats://localhost:4222",)
    group_id: str | None = None
    username: str | None = None
    password: Secret | None = None
    token: Secret | None = None
    nkey_seed: Secret | None = None
    user_jwt: Secret | None = None
    user_credentials: str | None = None
    use_tls: bool = False
    tls_verify: bool = True
    tls_ca_cert_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    jetstream: bool = False
    """Durable at-least-once mode (``MSIGHT_NATS_JETSTREAM``)."""
    connect_timeout: float = 5.0
    name: str | None = None
    reconnect_wait: float = 0.25
    """Seconds between reconnect attempts (``MSIGHT_NATS_RECONNECT_WAIT``)."""
    large_frame_ttl: float = 60.0
    """Seconds JetStream keeps the chunks of a frame above the server's
    ``max_payload`` (``MSIGHT_NATS_LARGE_FRAME_TTL``)."""
    large_frame_store_bytes: int = 1024 * MiB
    """Bound of the in-memory stream holding those chunks; the oldest frames go
    first (``MSIGHT_NATS_LARGE_FRAME_STORE_BYTES``)."""
    stream_max_age: float = 24 * 3600.0
    """JetStream mode: seconds a topic's stream keeps messages
    (``MSIGHT_NATS_STREAM_MAX_AGE``)."""
    stream_max_bytes: int = 0
    """JetStream mode: bound of a topic's stream, oldest dropped first; 0 for no
    bound but the age (``MSIGHT_NATS_STREAM_MAX_BYTES``). The server reserves
    this much storage per topic, so set it only where disk is plentiful."""
    stream_replicas: int = 1
    """JetStream mode: replicas of the topic streams the library creates, up to
    the cluster size (``MSIGHT_NATS_STREAM_REPLICAS``)."""
    ack_wait: float = 30.0
    """JetStream mode: seconds before an unacknowledged message is redelivered
    (``MSIGHT_NATS_ACK_WAIT``)."""
    queue: QueueConfig = field(default_factory=QueueConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)

    def __post_init__(self) -> None:
        if not self.servers:
            raise ConfigError("NATS servers must not be empty")
        object.__setattr__(self, "servers", tuple(self.servers))
        for server in self.servers:
            _check_nats_server(server)
        for name in ("reconnect_wait", "large_frame_ttl", "stream_max_age", "ack_wait"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ConfigError(
                    f"NATS {name} (MSIGHT_NATS_{name.upper()}) must be a positive number of seconds"
                )
        if self.large_frame_store_bytes < MiB:
            raise ConfigError(
                "NATS large_frame_store_bytes (MSIGHT_NATS_LARGE_FRAME_STORE_BYTES) "
                "must be at least 1 MiB"
            )
        if self.stream_max_bytes != 0 and self.stream_max_bytes < MiB:
            raise ConfigError(
                "NATS stream_max_bytes (MSIGHT_NATS_STREAM_MAX_BYTES) must be 0 (no bound) "
                "or at least 1 MiB"
            )


@dataclass(frozen=True, repr=False)
class KafkaConfig(_MaskedRepr):
    """Kafka settings (``MSIGHT_KAFKA_*``).

    ``producer``, ``consumer`` and ``client`` hold librdkafka properties passed
    through as they are (``client`` goes to both). From the environment:
    ``MSIGHT_KAFKA_CONSUMER_SESSION_TIMEOUT_MS=6000`` becomes consumer property
    ``session.timeout.ms``; likewise ``MSIGHT_KAFKA_PRODUCER_*`` and
    ``MSIGHT_KAFKA_CLIENT_*``.
    """

    servers: tuple[str, ...] = ("localhost:9092",)
    group_id: str | None = None
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    use_tls: bool = False
    tls_ca_cert_file: str | None = None
    num_partitions: int = 6
    """Partitions of topics the library creates (``MSIGHT_KAFKA_NUM_PARTITIONS``)."""
    replication_factor: int = 1
    """Replication of topics the library creates (``MSIGHT_KAFKA_REPLICATION_FACTOR``)."""
    max_message_bytes: int = 64 * MiB + 64 * 1024
    """``max.message.bytes`` of topics the library creates (``MSIGHT_KAFKA_MAX_MESSAGE_BYTES``)."""
    start: str = "latest"
    """Where a group with no committed offset starts: ``earliest`` or ``latest``
    (``MSIGHT_KAFKA_START``)."""
    ordered: bool = False
    """Pin each publisher instance to one partition per topic (a random key),
    so any Kafka consumer, raw ones included, reads its messages in order and
    msight subscribers never hold a message back; a group then balances across
    publishers, not messages (``MSIGHT_KAFKA_ORDERED``). Default: each
    publisher's messages go round the partitions, stamped with a sequence
    number, and msight subscribers restore each publisher's order (see
    ``order_wait``): order and balance both."""
    order_wait: float = 2.0
    """Seconds a subscriber holds a message back while an earlier message of
    the same publisher may still arrive from another partition
    (``MSIGHT_KAFKA_ORDER_WAIT``); nothing is held when nothing is missing.
    After that the earlier one is given up (counted) and a late arrival is
    delivered out of order. A tiny value restores order within each fetched batch only."""
    connect_timeout: float = 10.0
    """Seconds to wait for the broker before raising ``BrokerUnavailableError``
    (``MSIGHT_KAFKA_CONNECT_TIMEOUT``)."""
    delivery_timeout: float | None = None
    """Seconds the producer keeps trying to deliver an accepted message before
    reporting it as failed (librdkafka ``message.timeout.ms``;
    ``MSIGHT_KAFKA_DELIVERY_TIMEOUT``). Default: 3 x ``publish.timeout``."""
    producer: Mapping[str, Any] = field(default_factory=dict)
    consumer: Mapping[str, Any] = field(default_factory=dict)
    client: Mapping[str, Any] = field(default_factory=dict)
    queue: QueueConfig = field(default_factory=QueueConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)

    def __post_init__(self) -> None:
        if not self.servers:
            raise ConfigError("Kafka servers must not be empty")
        object.__setattr__(self, "servers", tuple(self.servers))
        if self.num_partitions < 1:
            raise ConfigError("Kafka num_partitions must be >= 1")
        if self.replication_factor < 1:
            raise ConfigError("Kafka replication_factor must be >= 1")
        if self.max_message_bytes < 1024:
            raise ConfigError("Kafka max_message_bytes must be >= 1024")
        if self.start not in ("earliest", "latest"):
            raise ConfigError("Kafka start must be 'earliest' or 'latest'")
        if not self.connect_timeout > 0:
            raise ConfigError("Kafka connect_timeout must be > 0")
        if self.delivery_timeout is not None and not 0 < self.delivery_timeout < 2**31 / 1000:
            raise ConfigError("Kafka delivery_timeout must be a positive number of seconds")
        if not 0 < self.order_wait <= 3600:
            raise ConfigError("Kafka order_wait must be > 0 and at most 3600 seconds")
        for name in ("producer", "consumer", "client"):
            props = dict(getattr(self, name))
            for key, value in props.items():
                if isinstance(value, str) and _is_secret_property(key):
                    props[key] = Secret(value)
            object.__setattr__(self, name, props)

    def __hash__(self) -> int:
        return hash((self.servers, self.group_id))


_SHM_DOMAIN_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


@dataclass(frozen=True)
class ShmConfig:
    """Same-host shared-memory settings (``MSIGHT_SHM_*``), used by ``ShmPubSub``.

    Every publisher of a topic reserves at most
    ``max_frame_bytes x (max_subscribers x (buffer_depth + max_views + 1) + prefault_frames + 2)``
    bytes of ``/dev/shm`` (:meth:`segment_bound`); the backend checks the free
    space before it creates one and raises :class:`ConfigError` when it does not fit.
    Only pages actually written are used: small frames cost little.
    """

    domain: str = "msight"
    """Prefix of every shared-memory file; only processes of one OS user with the same
    domain see each other (``MSIGHT_SHM_DOMAIN``; 1-32 of ``A-Za-z0-9_-``)."""
    max_frame_bytes: int = 32 * MiB
    """Largest payload; larger ones raise ``PayloadTooLargeError``
    (``MSIGHT_SHM_MAX_FRAME_BYTES``)."""
    max_subscribers: int = 8
    """Subscriber instances per topic without a group; each group member has a service
    of its own (``MSIGHT_SHM_MAX_SUBSCRIBERS``)."""
    max_publishers: int = 8
    """Publisher instances per topic (``MSIGHT_SHM_MAX_PUBLISHERS``)."""
    buffer_depth: int = 4
    """Samples waiting in shared memory for each subscriber; when a subscriber falls
    this far behind, the oldest is dropped and counted (``MSIGHT_SHM_BUFFER_DEPTH``).
    ``listen()``/``receive()`` move them at once into the receive queue
    (``MSIGHT_QUEUE_*``); views are read straight from here."""
    max_views: int = 2
    """Views one subscriber instance may hold at once (``MSIGHT_SHM_MAX_VIEWS``)."""
    max_group_members: int = 32
    """Members of one group a publisher delivers to (``MSIGHT_SHM_MAX_GROUP_MEMBERS``)."""
    prefault_frames: int = 4
    """Frames of a new size whose memory a publisher touches ahead of use, so the
    first frames are as fast as the rest; 0 to skip (``MSIGHT_SHM_PREFAULT_FRAMES``)."""
    queue: QueueConfig = field(default_factory=QueueConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.domain, str) or not _SHM_DOMAIN_RE.match(self.domain):
            raise ConfigError("shm domain must be 1-32 characters of A-Za-z0-9_-")
        limits = {
            "max_frame_bytes": (1024, 1 << 40),
            "max_subscribers": (1, 256),
            "max_publishers": (1, 256),
            "buffer_depth": (1, 1024),
            "max_views": (1, 256),
            "max_group_members": (1, 1024),
            "prefault_frames": (0, 64),
        }
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high:
                raise ConfigError(
                    f"shm {name} must be an integer in [{low}, {high}], got {value!r}"
                )

    def samples_per_publisher(self, subscribers: int | None = None) -> int:
        """Sample slots one publisher of a topic may need (``subscribers`` ports at most)."""
        subs = self.max_subscribers if subscribers is None else subscribers
        return subs * (self.buffer_depth + self.max_views + 1) + self.prefault_frames + 2

    def segment_bound(self, subscribers: int | None = None) -> int:
        """Most bytes of ``/dev/shm`` one publisher of a topic can use."""
        return self.samples_per_publisher(subscribers) * (self.max_frame_bytes + 4096)


@dataclass(frozen=True)
class MetricsConfig:
    """Where a node serves Prometheus metrics (extra ``metrics``; see :mod:`msight_core.metrics`)."""

    port: int | None = None
    """TCP port of the node's ``/metrics`` endpoint; unset: no endpoint, ``0``: any free
    port (logged). The nodes of a process with the same setting share one
    endpoint (``MSIGHT_METRICS_PORT``)."""
    address: str = "0.0.0.0"
    """Address the endpoint listens on; ``127.0.0.1`` keeps it to this
    host (``MSIGHT_METRICS_ADDRESS``)."""

    def __post_init__(self) -> None:
        port = self.port
        if port is not None and (type(port) is not int or not 0 <= port <= 65535):
            raise ConfigError(f"metrics port must be an integer in [0, 65535], got {port!r}")
        if not isinstance(self.address, str) or not self.address:
            raise ConfigError("metrics address must be a host name or address")


# --------------------------------------------------------------------------- parsing

_BOOL_TRUE = {"1", "true", "yes", "on", "y", "t"}
_BOOL_FALSE = {"0", "false", "no", "off", "n", "f", ""}
_ITEM_RE = re.compile(r"^[^\s'\"\[\],]+$")
_SECRET_WORDS = ("password", "secret", "token", "key", "jwt", "seed", "credential")


def _is_secret_property(key: str) -> bool:
    """A pass-through client property whose value must never be shown.

    Every ``sasl.*`` property (``sasl.oauthbearer.config`` carries client
    secrets), any ``ssl.*`` property naming a key, and anything named like a
    password, secret, token, key, JWT, seed or credential; file locations excepted.
    """
    lowered = key.lower()
    if lowered.endswith((".location", ".file")):
        return False
    if lowered.startswith("sasl.") or (lowered.startswith("ssl.") and "key" in lowered):
        return True
    return any(word in lowered for word in _SECRET_WORDS)


_URL_CREDENTIALS = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]{0,31}://)(?P<userinfo>[^@/\s]*)@"
)  # bounded: linear


def mask_url(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``.

    ``nats://alice:pw@host:4222`` -> ``nats://alice:***@host:4222``;
    ``nats://s3cr3t-token@host`` -> ``nats://***@host``. The one function every
    message, repr and display of a server address goes through.
    """

    def hide(match: re.Match[str]) -> str:
        user, sep, _ = match["userinfo"].partition(":")
        shown = f"{user}:***" if sep else "***"
        return f"{match['scheme']}{shown}@"

    return _URL_CREDENTIALS.sub(hide, text)


def masked(value: Any, key: str = "") -> Any:
    """A copy of a configuration value that is safe to show: secrets as ``***``,
    credentials in URLs masked, secret-named properties of mappings hidden."""
    if isinstance(value, Secret) or (key and _is_secret_property(key) and value is not None):
        return "***"
    if isinstance(value, str):
        return mask_url(value)
    if isinstance(value, tuple):
        return tuple(masked(v) for v in value)
    if isinstance(value, list):
        return [masked(v) for v in value]
    if isinstance(value, Mapping):
        return {k: masked(v, str(k)) for k, v in value.items()}
    return value


def _shown(value: str) -> str:
    """A short, safe rendering of a (non-secret) bad value for error messages."""
    value = mask_url(value)
    text = value if len(value) <= 60 else value[:57] + "..."
    return repr(text)


_warned_no_verify: set[str] = set()


def _tls_files(prefix: str) -> tuple[str, ...]:
    return (prefix + "TLS_CA_CERT_FILE", prefix + "TLS_CERT_FILE", prefix + "TLS_KEY_FILE")


def _use_tls(explicit: bool | None, var: str, e: _Env, files: tuple[str, ...]) -> bool:
    """TLS is on when ``var`` says so, or when TLS files are configured and ``var``
    is unset: a CA or certificate file means TLS was meant.

    Raises:
        ConfigError: ``var`` is false while TLS files are configured.
    """
    given = [name for name in files if e.raw(name) is not None]
    if explicit is None:
        return bool(given)
    on = explicit
    if not on and given:
        raise ConfigError(
            f"{var} is false but {', '.join(given)} {'is' if len(given) == 1 else 'are'} set: "
            f"set {var}=true to use TLS, or unset {'it' if len(given) == 1 else 'them'}"
        )
    return on


def _warn_if_unverified(use_tls: bool, verify: bool, var: str) -> None:
    """A WARNING, once per process and variable, when TLS runs without verification."""
    if use_tls and not verify and var not in _warned_no_verify:
        _warned_no_verify.add(var)
        logger.warning(
            "%s=false: TLS certificate verification is off; traffic is encrypted but the "
            "server is not authenticated (anyone on the path can impersonate it)",
            var,
        )


def parse_bool(value: str, var: str = "value") -> bool:
    """Parse ``true/false/1/0/yes/no/on/off`` (any case); else :class:`ConfigError`."""
    lowered = value.strip().lower()
    if lowered in _BOOL_TRUE:
        return True
    if lowered in _BOOL_FALSE:
        return False
    raise ConfigError(f"{var} must be a boolean (true/false), got {_shown(value)}")


def _parse_int(value: str, var: str, minimum: int = 0, maximum: int | None = None) -> int:
    try:
        number = int(value.strip().replace("_", ""), 10)
    except ValueError:
        raise ConfigError(f"{var} must be an integer, got {_shown(value)}") from None
    if number < minimum or (maximum is not None and number > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ConfigError(f"{var} must be {bound}, got {number}")
    return number


def _parse_float(value: str, var: str, maximum: float | None = None) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        raise ConfigError(f"{var} must be a number, got {_shown(value)}") from None
    if not (number > 0 and number < float("inf")):
        raise ConfigError(f"{var} must be a positive finite number, got {_shown(value)}")
    if maximum is not None and number > maximum:
        raise ConfigError(f"{var} must be at most {maximum:g}, got {_shown(value)}")
    return number


def parse_server_list(value: str, var: str = "server list") -> tuple[str, ...]:
    """Parse ``"['a:1', 'b:2']"``, ``'["a:1"]'`` or ``"a:1, b:2"`` into a tuple.

    Raises:
        ConfigError: the value is empty or malformed; the message names ``var``.
    """
    text = value.strip()
    if text.startswith("[") or text.endswith("]"):
        if not (text.startswith("[") and text.endswith("]")):
            raise ConfigError(f"{var}: unbalanced brackets in {_shown(value)}")
        text = text[1:-1]
    parts = text.split(",")
    if len(parts) > 1 and parts[-1].strip() == "":
        parts.pop()  # tolerate one trailing comma, as Python lists do
    items: list[str] = []
    for raw in parts:
        item = raw.strip()
        if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"":
            item = item[1:-1].strip()
        if not item:
            if len(parts) == 1:
                break
            raise ConfigError(f"{var}: empty entry in {_shown(value)}")
        if not _ITEM_RE.match(item):
            raise ConfigError(f"{var}: malformed entry {_shown(item)} in {_shown(value)}")
        items.append(item)
    if not items:
        raise ConfigError(f"{var} must list at least one server, got {_shown(value)}")
    return tuple(items)


def parse_redis_node(entry: str, default_port: int = 6379) -> tuple[str, int]:
    """``"host:port"``, ``"redis://host:port"`` or ``"[::1]:port"`` -> ``(host, port)``.

    Used for ``MSIGHT_REDIS_MESSAGE_BROKER_CLUSTER_NODES`` entries and for the
    addresses in a cluster's ``MOVED`` replies. Credentials in a URL are skipped.

    Raises:
        ConfigError: the port is not a number in [1, 65535].
    """
    text = entry.strip()
    if "://" in text:
        text = text.split("://", 1)[1].rsplit("@", 1)[-1].split("/", 1)[0]
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.lstrip(":")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ConfigError(f"Redis cluster node {_shown(host)} is not host:port") from None
    _check_port(f"Redis cluster node {_shown(host)}", port)
    return host or "localhost", port


def _check_nats_server(url: str) -> None:
    """A NATS server URL's port is a number in [1, 65535] (nats-py would raise a
    bare ``ValueError`` at connect time). The message names the host, never the
    credentials a URL may carry."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        host = parts.hostname
        port_text = parts.netloc.rpartition("@")[2]
        port_text = port_text.rpartition("]")[2] if port_text.startswith("[") else port_text
        port_text = port_text.rpartition(":")[2] if ":" in port_text else ""
    except ValueError:
        raise ConfigError("MSIGHT_NATS_SERVERS: a server URL is malformed") from None
    if not port_text:
        return
    shown = repr(host or "?")
    if not port_text.isdigit():
        raise ConfigError(
            f"MSIGHT_NATS_SERVERS: the port of server {shown} is not a number "
            f"(got {_shown(port_text)})"
        )
    _check_port(f"MSIGHT_NATS_SERVERS: the port of server {shown}", int(port_text))


def _check_port(var: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise ConfigError(f"{var} must be a TCP port in [1, 65535], got {port}")


class _Env:
    """Typed access to one environment mapping, naming the variable on errors."""

    def __init__(self, env: Mapping[str, str] | None) -> None:
        self.env = os.environ if env is None else env

    def raw(self, var: str) -> str | None:
        value = self.env.get(var)
        if value is None or value.strip() == "":
            return None
        return value

    def str(self, var: str) -> str | None:
        value = self.raw(var)
        return None if value is None else value.strip()

    def secret(self, var: str) -> Secret | None:
        value = self.raw(var)
        return None if value is None else Secret(value.strip())

    def bool(self, var: str, default: bool) -> bool:
        value = self.raw(var)
        return default if value is None else parse_bool(value, var)

    def int(self, var: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
        value = self.raw(var)
        return default if value is None else _parse_int(value, var, minimum, maximum)

    def float(self, var: str, default: float, maximum: float | None = None) -> float:
        value = self.raw(var)
        return default if value is None else _parse_float(value, var, maximum)

    def servers(self, var: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.raw(var)
        return default if value is None else parse_server_list(value, var)

    def prefixed(self, prefix: str) -> dict[str, str]:
        """``PREFIX_SESSION_TIMEOUT_MS=6000`` -> ``{"session.timeout.ms": "6000"}``."""
        out: dict[str, str] = {}
        for key, value in self.env.items():
            if key.startswith(prefix) and len(key) > len(prefix):
                out[key[len(prefix) :].lower().replace("_", ".")] = value.strip()
        return out


def environment() -> dict[str, str]:
    """A copy of the process environment, for callers (the CLI, the embedded-broker
    launcher) that amend or inspect it before handing it to a loader as ``env=``."""
    return dict(os.environ)


def _replace(config: _T, overrides: Mapping[str, Any]) -> _T:
    try:
        return dataclasses.replace(config, **overrides)  # type: ignore[type-var]
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


def backend_name(env: Mapping[str, str] | None = None) -> str:
    """The backend chosen by ``MSIGHT_PUBSUB_BACKEND`` (default ``redis``)."""
    value = _Env(env).str("MSIGHT_PUBSUB_BACKEND")
    if value is None:
        return "redis"
    name = value.lower()
    if name not in BACKENDS:
        raise ConfigError(
            f"MSIGHT_PUBSUB_BACKEND={_shown(value)} is not a backend; valid: {', '.join(BACKENDS)}"
        )
    return name


def load_queue_config(env: Mapping[str, str] | None = None, **overrides: Any) -> QueueConfig:
    e = _Env(env)
    overflow = e.str("MSIGHT_QUEUE_OVERFLOW")
    if overflow is not None:
        try:
            policy = OverflowPolicy(overflow.lower())
        except ValueError:
            valid = ", ".join(p.value for p in OverflowPolicy)
            raise ConfigError(
                f"MSIGHT_QUEUE_OVERFLOW must be one of {valid}, got {_shown(overflow)}"
            ) from None
    else:
        policy = OverflowPolicy.DROP_OLDEST
    config = QueueConfig(
        max_messages=e.int("MSIGHT_QUEUE_MAX_MESSAGES", QueueConfig.max_messages, minimum=1),
        max_bytes=e.int("MSIGHT_QUEUE_MAX_BYTES", QueueConfig.max_bytes, minimum=1),
        overflow=policy,
    )
    return _replace(config, overrides)


def load_publish_config(env: Mapping[str, str] | None = None, **overrides: Any) -> PublishConfig:
    e = _Env(env)
    config = PublishConfig(
        buffer_bytes=e.int("MSIGHT_PUBLISH_BUFFER_BYTES", PublishConfig.buffer_bytes, minimum=1),
        timeout=e.float("MSIGHT_PUBLISH_TIMEOUT", PublishConfig.timeout),
    )
    return _replace(config, overrides)


def load_redis_config(env: Mapping[str, str] | None = None, **overrides: Any) -> RedisConfig:
    """Build a :class:`RedisConfig` from ``MSIGHT_REDIS_MESSAGE_BROKER_*``."""
    e = _Env(env)
    p = "MSIGHT_REDIS_MESSAGE_BROKER_"
    config = RedisConfig(
        host=e.str(p + "HOST") or "localhost",
        port=e.int(p + "PORT", 6379, minimum=1, maximum=65535),
        db=e.int(p + "DB", 0, minimum=0, maximum=1_000_000),
        username=e.str(p + "USERNAME"),
        password=e.secret(p + "PASSWORD"),
        use_tls=_use_tls(e.bool(p + "USE_TLS", None), p + "USE_TLS", e, _tls_files(p)),  # type: ignore[arg-type]
        tls_ca_cert_file=e.str(p + "TLS_CA_CERT_FILE"),
        tls_cert_file=e.str(p + "TLS_CERT_FILE"),
        tls_key_file=e.str(p + "TLS_KEY_FILE"),
        tls_verify=e.bool(p + "TLS_VERIFY", True),
        use_cluster=e.bool(p + "USE_CLUSTER", False),
        cluster_nodes=e.servers(p + "CLUSTER_NODES", ()),
        connect_timeout=e.float(p + "CONNECT_TIMEOUT", 5.0),
        queue=load_queue_config(env),
        publish=load_publish_config(env),
    )
    config = _replace(config, overrides)
    _warn_if_unverified(config.use_tls, config.tls_verify, p + "TLS_VERIFY")
    return config


def load_nats_config(
    group_id: str | None = None, env: Mapping[str, str] | None = None, **overrides: Any
) -> NatsConfig:
    """Build a :class:`NatsConfig` from ``MSIGHT_NATS_*``."""
    e = _Env(env)
    p = "MSIGHT_NATS_"
    config = NatsConfig(
        servers=e.servers(p + "SERVERS", NatsConfig.servers),
        group_id=group_id,
        username=e.str(p + "USERNAME"),
        password=e.secret(p + "PASSWORD"),
        token=e.secret(p + "TOKEN"),
        nkey_seed=e.secret(p + "NKEY_SEED"),
        user_jwt=e.secret(p + "USER_JWT"),
        user_credentials=e.str(p + "USER_CREDENTIALS"),
        use_tls=_use_tls(e.bool(p + "USE_TLS", None), p + "USE_TLS", e, _tls_files(p)),  # type: ignore[arg-type]
        tls_verify=e.bool(p + "TLS_VERIFY", True),
        tls_ca_cert_file=e.str(p + "TLS_CA_CERT_FILE"),
        tls_cert_file=e.str(p + "TLS_CERT_FILE"),
        tls_key_file=e.str(p + "TLS_KEY_FILE"),
        jetstream=e.bool(p + "JETSTREAM", False),
        connect_timeout=e.float(p + "CONNECT_TIMEOUT", 5.0),
        name=e.str(p + "CLIENT_NAME"),
        reconnect_wait=e.float(p + "RECONNECT_WAIT", NatsConfig.reconnect_wait),
        large_frame_ttl=e.float(p + "LARGE_FRAME_TTL", NatsConfig.large_frame_ttl),
        large_frame_store_bytes=e.int(
            p + "LARGE_FRAME_STORE_BYTES", NatsConfig.large_frame_store_bytes, minimum=MiB
        ),
        stream_max_age=e.float(p + "STREAM_MAX_AGE", NatsConfig.stream_max_age),
        stream_max_bytes=e.int(p + "STREAM_MAX_BYTES", NatsConfig.stream_max_bytes, minimum=0),
        stream_replicas=e.int(p + "STREAM_REPLICAS", 1, minimum=1, maximum=5),
        ack_wait=e.float(p + "ACK_WAIT", NatsConfig.ack_wait),
        queue=load_queue_config(env),
        publish=load_publish_config(env),
    )
    config = _replace(config, overrides)
    tls = config.use_tls or any(s.startswith("tls://") for s in config.servers)
    _warn_if_unverified(tls, config.tls_verify, p + "TLS_VERIFY")
    return config


def nats_connect_options(config: NatsConfig) -> dict[str, Any]:
    """Keyword arguments for nats-py's ``connect()`` (callbacks excluded).

    Servers, timeouts, the reconnect policy (the first connect tries each
    server once), authentication and a TLS context. Inline JWT credentials are
    a :class:`collections.UserString`, which nats-py reads as the text of a
    credentials file. Secrets are revealed into the result: hand it to a
    client, never log it.

    Raises:
        ConfigError: TLS files cannot be loaded, or auth settings conflict.
    """
    from collections import UserString

    options: dict[str, Any] = {
        "servers": list(config.servers),
        "connect_timeout": config.connect_timeout,
        "reconnect_time_wait": config.reconnect_wait,
        "max_reconnect_attempts": 1,
        "allow_reconnect": True,
        "ping_interval": 5,
        "max_outstanding_pings": 3,
        # msight's writer bounds what it hands to nats-py and flushes it itself:
        # nats-py must never flush in the middle of a message.
        "pending_size": 1 << 30,
        "flush_timeout": max(config.publish.timeout, 1.0),
        "drain_timeout": max(int(config.publish.timeout), 1),
    }
    if config.name:
        options["name"] = config.name
    if config.username is not None:
        options["user"] = config.username
        options["password"] = config.password.reveal() if config.password else ""
    if config.token is not None:
        options["token"] = config.token.reveal()
    if config.user_jwt is not None:
        if config.nkey_seed is None:
            raise ConfigError("MSIGHT_NATS_USER_JWT needs MSIGHT_NATS_NKEY_SEED to sign with")
        options["user_credentials"] = UserString(
            "-----BEGIN NATS USER JWT-----\n"
            f"{config.user_jwt.reveal()}\n"
            "------END NATS USER JWT------\n\n"
            "-----BEGIN USER NKEY SEED-----\n"
            f"{config.nkey_seed.reveal()}\n"
            "------END USER NKEY SEED------\n"
        )
    elif config.user_credentials is not None:
        options["user_credentials"] = config.user_credentials
    elif config.nkey_seed is not None:
        options["nkeys_seed_str"] = config.nkey_seed.reveal()
    tls_wanted = config.use_tls or any(s.startswith("tls://") for s in config.servers)
    if tls_wanted or config.tls_ca_cert_file or config.tls_cert_file:
        # No tls_hostname: nats-py then verifies each server against its own host
        # name (and a discovered IP-only server against the host it was learnt
        # from), so failing over to another server verifies that server.
        options["tls"] = _nats_tls_context(config)
    return options


def _nats_tls_context(config: NatsConfig) -> Any:
    import ssl

    try:
        context = ssl.create_default_context(cafile=config.tls_ca_cert_file)
        if config.tls_cert_file:
            context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the NATS TLS files (MSIGHT_NATS_TLS_*): {type(exc).__name__}: "
            f"{getattr(exc, 'strerror', None) or exc}"
        ) from None
    if not config.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def load_kafka_config(
    group_id: str | None = None, env: Mapping[str, str] | None = None, **overrides: Any
) -> KafkaConfig:
    """Build a :class:`KafkaConfig` from ``MSIGHT_KAFKA_*`` (see the class for pass-through)."""
    e = _Env(env)
    p = "MSIGHT_KAFKA_"
    start = (e.str(p + "START") or "latest").lower()
    if start not in ("earliest", "latest"):
        raise ConfigError(f"{p}START must be 'earliest' or 'latest', got {_shown(start)}")
    config = KafkaConfig(
        servers=e.servers(p + "SERVERS", KafkaConfig.servers),
        group_id=group_id,
        sasl_mechanism=e.str(p + "SASL_MECHANISM"),
        sasl_username=e.str(p + "SASL_USERNAME"),
        sasl_password=e.secret(p + "SASL_PASSWORD"),
        use_tls=_use_tls(e.bool(p + "USE_TLS", None), p + "USE_TLS", e, (p + "TLS_CA_CERT_FILE",)),  # type: ignore[arg-type]
        tls_ca_cert_file=e.str(p + "TLS_CA_CERT_FILE"),
        num_partitions=e.int(p + "NUM_PARTITIONS", KafkaConfig.num_partitions, minimum=1),
        replication_factor=e.int(p + "REPLICATION_FACTOR", 1, minimum=1, maximum=1000),
        max_message_bytes=e.int(
            p + "MAX_MESSAGE_BYTES", KafkaConfig.max_message_bytes, minimum=1024
        ),
        start=start,
        ordered=e.bool(p + "ORDERED", False),
        order_wait=e.float(p + "ORDER_WAIT", KafkaConfig.order_wait, maximum=3600),
        connect_timeout=e.float(p + "CONNECT_TIMEOUT", KafkaConfig.connect_timeout),
        # librdkafka takes milliseconds in a 32-bit int.
        delivery_timeout=e.float(p + "DELIVERY_TIMEOUT", 0.0, maximum=2_000_000) or None,
        producer=e.prefixed(p + "PRODUCER_"),
        consumer=e.prefixed(p + "CONSUMER_"),
        client=e.prefixed(p + "CLIENT_"),
        queue=load_queue_config(env),
        publish=load_publish_config(env),
    )
    config = _replace(config, overrides)
    for role in ("client", "producer", "consumer"):
        value = str(getattr(config, role).get("enable.ssl.certificate.verification", "true"))
        if value.strip().lower() in _BOOL_FALSE - {""}:
            var = f"{p}{role.upper()}_ENABLE_SSL_CERTIFICATE_VERIFICATION"
            _warn_if_unverified(True, False, var)
    return config


def kafka_client_conf(config: KafkaConfig) -> dict[str, Any]:
    """librdkafka properties every Kafka client of ``config`` shares.

    Servers, connection timeouts, security (SASL/TLS) and the ``client``
    pass-through, which overrides the rest. Plain values only: a caller adds
    the callbacks and the ``logger`` it needs, then its role's properties.
    Secrets are revealed into the result: hand it to a client, never log it.
    """
    conf: dict[str, Any] = {
        "bootstrap.servers": ",".join(config.servers),
        "socket.connection.setup.timeout.ms": max(1000, int(config.connect_timeout * 1000)),
        # Back at most 1 s after a broker returns (librdkafka default: up to 10 s).
        "reconnect.backoff.max.ms": 1000,
        # Topics are created by msight with the configured partitions and
        # max.message.bytes, never by the broker's defaults behind our back.
        "allow.auto.create.topics": False,
    }
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
    conf.update((k, v.reveal() if isinstance(v, Secret) else v) for k, v in config.client.items())
    return conf


def load_shm_config(env: Mapping[str, str] | None = None, **overrides: Any) -> ShmConfig:
    """Build a :class:`ShmConfig` from ``MSIGHT_SHM_*`` (and ``MSIGHT_QUEUE_*``)."""
    e = _Env(env)
    p = "MSIGHT_SHM_"
    d = ShmConfig
    config = ShmConfig(
        domain=e.str(p + "DOMAIN") or d.domain,
        max_frame_bytes=e.int(p + "MAX_FRAME_BYTES", d.max_frame_bytes, 1024, 1 << 40),
        max_subscribers=e.int(p + "MAX_SUBSCRIBERS", d.max_subscribers, 1, 256),
        max_publishers=e.int(p + "MAX_PUBLISHERS", d.max_publishers, 1, 256),
        buffer_depth=e.int(p + "BUFFER_DEPTH", d.buffer_depth, 1, 1024),
        max_views=e.int(p + "MAX_VIEWS", d.max_views, 1, 256),
        max_group_members=e.int(p + "MAX_GROUP_MEMBERS", d.max_group_members, 1, 1024),
        prefault_frames=e.int(p + "PREFAULT_FRAMES", d.prefault_frames, 0, 64),
        queue=load_queue_config(env),
    )
    return _replace(config, overrides)


def load_metrics_config(env: Mapping[str, str] | None = None, **overrides: Any) -> MetricsConfig:
    """Build a :class:`MetricsConfig` from ``MSIGHT_METRICS_*``."""
    e = _Env(env)
    p = "MSIGHT_METRICS_"
    port = e.int(p + "PORT", -1, minimum=0, maximum=65535)
    config = MetricsConfig(
        port=None if port < 0 else port,
        address=e.str(p + "ADDRESS") or MetricsConfig.address,
    )
    return _replace(config, overrides)
