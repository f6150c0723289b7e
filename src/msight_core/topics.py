"""Topics: names that work on every broker, and the :class:`Topic` value.

A topic name must be portable across Redis channels, NATS subjects and Kafka
topics, so that switching ``MSIGHT_PUBSUB_BACKEND`` never breaks a deployment:
1 to 249 characters of ``A-Za-z0-9._-``, with no empty token between dots
(Kafka's limit on length and characters, NATS's rule on tokens). Names under
:data:`RESERVED_TOPIC_PREFIXES` (``_msight.``, where the NATS backend sends large
frames, and ``_INBOX.``, NATS's reply subjects) are refused: a user topic there
would let a publisher forge internal traffic or read other clients' replies.
Like NATS subjects, the prefixes are case-sensitive (``_inbox.x`` is a user topic).
The backends address their internal subjects directly, never through this check.

The topic registry lives in Redis as msight-core 2.x keeps it: one hash,
``MSIGHT:TOPICS``, field = topic name, value = JSON
``{"name", "description", "data_type"}`` where ``data_type`` is the class path
(``msight_core.data.image.ImageData``). Reading it never imports anything: the
type is looked up among registered :class:`~msight_core.data.Data` subclasses.
NATS/Kafka-only deployments can skip the registry and build ``Topic("name",
data_type=ImageData)`` directly.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .errors import (
    AuthenticationError,
    BrokerError,
    BrokerUnavailableError,
    ConfigError,
    InvalidTopicError,
    MsightError,
    TopicNotFoundError,
)

__all__ = [
    "MAX_TOPIC_LENGTH",
    "REDIS_TOPICS_KEY",
    "RESERVED_TOPIC_PREFIXES",
    "Topic",
    "get_topic",
    "is_topic_pattern",
    "list_topics",
    "pattern_covers",
    "patterns_overlap",
    "subscription_name",
    "subscription_set",
    "topic_filter",
    "topic_matcher",
    "topic_name",
    "validate_topic_name",
    "validate_topic_pattern",
]

logger = logging.getLogger(__name__)

#: The Redis hash holding the topic registry (msight-core 2.x's ``REDIS_TOPICS_FIELD``).
REDIS_TOPICS_KEY = "MSIGHT:TOPICS"
REDIS_TOPICS_FIELD = REDIS_TOPICS_KEY

MAX_TOPIC_LENGTH = 249
#: Name prefixes kept for msight's and NATS's own subjects (case-sensitive, as in NATS).
RESERVED_TOPIC_PREFIXES = ("_msight.", "_INBOX.")
_TOPIC_RE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")


def validate_topic_name(name: str) -> str:
    """Return ``name`` if it is portable across all brokers.

    Raises:
        InvalidTopicError: the name is empty, too long, has other characters, or
            starts with a reserved prefix (:data:`RESERVED_TOPIC_PREFIXES`).
    """
    if not isinstance(name, str):
        raise InvalidTopicError(f"topic name must be a str, got {type(name).__name__}")
    if not 1 <= len(name) <= MAX_TOPIC_LENGTH:
        raise InvalidTopicError(
            f"topic name must be 1-{MAX_TOPIC_LENGTH} characters, got {len(name)}"
        )
    if _TOPIC_RE.fullmatch(name) is None:
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise InvalidTopicError(
            f"topic name {shown!r} is not portable: use A-Za-z0-9._- "
            "with no empty token between dots"
        )
    if name.startswith(RESERVED_TOPIC_PREFIXES):
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise InvalidTopicError(
            f"topic name {shown!r} is reserved: names starting with "
            f"{' or '.join(RESERVED_TOPIC_PREFIXES)} are msight's and NATS's own subjects"
        )
    return name


_PATTERN_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+|\*|>")


def is_topic_pattern(name: str) -> bool:
    """True if ``name`` has a wildcard token (``*`` or ``>``)."""
    return "*" in name or ">" in name


def validate_topic_pattern(pattern: str) -> str:
    """Return ``pattern`` if it is a portable wildcard subscription.

    Tokens are separated by dots, as in topic names; a token may be ``*`` (any
    one token) and the last token may be ``>`` (one or more tokens), with NATS
    semantics: ``camera1.*`` matches ``camera1.frames`` but not
    ``camera1.frames.raw``; ``camera1.>`` matches both.

    Raises:
        InvalidTopicError: malformed, too long, or reserved.
    """
    if not isinstance(pattern, str):
        raise InvalidTopicError(f"topic pattern must be a str, got {type(pattern).__name__}")
    shown = pattern if len(pattern) <= 60 else pattern[:57] + "..."
    if not 1 <= len(pattern) <= MAX_TOPIC_LENGTH:
        raise InvalidTopicError(
            f"topic pattern must be 1-{MAX_TOPIC_LENGTH} characters, got {len(pattern)}"
        )
    tokens = pattern.split(".")
    for i, token in enumerate(tokens):
        if _PATTERN_TOKEN_RE.fullmatch(token) is None or (token == ">" and i != len(tokens) - 1):
            raise InvalidTopicError(
                f"topic pattern {shown!r} is not portable: tokens of A-Za-z0-9_-, or '*' for "
                "one token, or '>' as the last token for the rest"
            )
    if pattern.startswith(RESERVED_TOPIC_PREFIXES) or tokens[0] in ("*", ">"):
        # A leading wildcard would reach msight's and NATS's own subjects too.
        raise InvalidTopicError(
            f"topic pattern {shown!r} must start with a literal token that is not reserved"
        )
    return pattern


def topic_matcher(pattern: str) -> re.Pattern[str]:
    """A compiled regular expression matching exactly the topics ``pattern`` covers."""
    parts = []
    for token in validate_topic_pattern(pattern).split("."):
        if token == "*":
            parts.append(r"[A-Za-z0-9_-]+")
        elif token == ">":
            parts.append(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
        else:
            parts.append(re.escape(token))
    return re.compile(r"\.".join(parts))


def subscription_name(topic: Any) -> str:
    """What ``subscribe()`` takes: a validated topic name, or a wildcard pattern.

    ``camera1.*`` and ``camera1.>`` are checked with :func:`validate_topic_pattern`;
    anything else (a :class:`Topic` or a plain name) with :func:`topic_name`.

    Raises:
        InvalidTopicError: neither a portable name nor a portable pattern.
    """
    if isinstance(topic, str) and is_topic_pattern(topic):
        return validate_topic_pattern(topic)
    return topic_name(topic)


def topic_filter(subscriptions: Iterable[str]) -> Callable[[str], bool]:
    """A predicate true for the topics that names or patterns in ``subscriptions`` cover.

    Raises:
        InvalidTopicError: an entry is neither a portable name nor a portable pattern.
    """
    names: set[str] = set()
    matchers: list[re.Pattern[str]] = []
    for entry in subscriptions:
        entry = subscription_name(entry)
        if is_topic_pattern(entry):
            matchers.append(topic_matcher(entry))
        else:
            names.add(entry)

    def covers(topic: str) -> bool:
        return topic in names or any(m.fullmatch(topic) for m in matchers)

    return covers


def pattern_covers(wide: str, narrow: str) -> bool:
    """True if every topic ``narrow`` (a name or pattern) matches, ``wide`` matches too.

    ``camera1.>`` covers ``camera1.*`` and ``camera1.left.raw``; ``camera1.*``
    covers ``camera1.frames`` but not ``camera1.>``. Both must be valid.
    """
    w, n = wide.split("."), narrow.split(".")
    for i, token in enumerate(w):
        if token == ">":
            return i < len(n)  # one or more tokens left in narrow: any of them
        if i >= len(n) or n[i] == ">" or (token != "*" and (n[i] == "*" or n[i] != token)):
            return False
    return len(n) == len(w)


def patterns_overlap(a: str, b: str) -> bool:
    """True if some topic is matched by both ``a`` and ``b`` (names or patterns)."""
    x, y = a.split("."), b.split(".")
    for i in range(max(len(x), len(y))):
        if i >= len(x) or i >= len(y):
            return False
        if ">" in (x[i], y[i]):
            return True
        if "*" not in (x[i], y[i]) and x[i] != y[i]:
            return False
    return True


def subscription_set(entries: Iterable[Any]) -> list[str]:
    """Validated subscriptions with repeats and covered entries left out, in order.

    A message on a topic that several of one instance's subscriptions match
    arrives once per matching subscription on Redis, NATS, memory and shm (the
    brokers deliver per subscription), and once on Kafka. Tools that take a
    list (``msight record``, ``view``, ``hz``, ``bw``, the bridge) subscribe to
    this set so ``camera1.frames 'camera1.*'`` records each frame once; two
    patterns that only partly overlap are kept both, with a warning.

    Raises:
        InvalidTopicError: an entry is neither a portable name nor a portable pattern.
    """
    wanted = list(dict.fromkeys(subscription_name(e) for e in entries))
    kept = [
        entry
        for i, entry in enumerate(wanted)
        if not any(j != i and pattern_covers(other, entry) for j, other in enumerate(wanted))
    ]
    for i, entry in enumerate(kept):
        for other in kept[i + 1 :]:
            if patterns_overlap(entry, other):
                logger.warning(
                    "subscriptions %r and %r overlap: a topic both match arrives once per "
                    "subscription (on Kafka once)",
                    entry,
                    other,
                )
    return kept


def topic_name(topic: Any) -> str:
    """The validated name of a :class:`Topic`, any object with ``.name``, or a ``str``.

    Raises:
        InvalidTopicError: no usable name.
    """
    if isinstance(topic, str):
        return validate_topic_name(topic)
    name = getattr(topic, "name", None)
    if name is None:
        raise InvalidTopicError(
            f"expected a Topic (an object with .name) or a str, got {type(topic).__name__}"
        )
    return validate_topic_name(name)


@dataclass(frozen=True)
class Topic:
    """A named stream of one data type.

    Attributes:
        name: the portable topic name.
        data_type: name of the :class:`~msight_core.data.Data` subclass carried, if known.
        description: free text.
    """

    name: str
    data_type: str | None = None
    description: str | None = None

    def __post_init__(self) -> None:
        validate_topic_name(self.name)
        if self.data_type is not None and not isinstance(self.data_type, str):
            # Accept a Data subclass for convenience; store its registered name.
            tag = getattr(self.data_type, "__data_tag__", None)
            object.__setattr__(self, "data_type", tag or getattr(self.data_type, "__name__", None))

    def __str__(self) -> str:
        return self.name

    @property
    def data_class(self) -> type | None:
        """The registered :class:`~msight_core.data.Data` subclass named by
        ``data_type``, or ``None`` (no type, or not defined in this process)."""
        return _resolve_type(self.data_type)

    def to_dict(self) -> dict[str, Any]:
        """The registry's JSON form: ``name``, ``description``, ``data_type`` (class path)."""
        cls = self.data_class
        path = f"{cls.__module__}.{cls.__qualname__}" if cls is not None else self.data_type
        return {"name": self.name, "description": self.description, "data_type": path}

    @classmethod
    def from_dict(cls, d: Any) -> Topic:
        """A Topic from its registry form; the type is resolved without importing.

        Raises:
            InvalidTopicError: ``d`` is not a registry entry with a valid name.
        """
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise InvalidTopicError("topic registry entry is not an object with a name")
        data_type = d.get("data_type")
        if data_type is not None and not isinstance(data_type, str):
            raise InvalidTopicError("topic registry entry has a non-string data_type")
        found = _resolve_type(data_type)
        description = d.get("description")
        return cls(
            d["name"],
            getattr(found, "__data_tag__", None) or data_type,
            description if isinstance(description, str) else None,
        )

    def register(self, redis_client: Any = None, overwrite: bool = True) -> None:
        """Write this topic to the Redis registry (``HSET MSIGHT:TOPICS name json``).

        Blocks for one round trip. Args: ``redis_client`` (default: a client from
        ``MSIGHT_REDIS_MESSAGE_BROKER_*``, closed afterwards); ``overwrite=False``
        keeps an existing entry.

        Raises:
            BrokerUnavailableError: Redis cannot be reached.
            BrokerError: Redis refused the command.
        """
        own = redis_client is None
        if own:
            from .utils import get_redis_client

            redis_client = get_redis_client()
        try:
            value = json.dumps(self.to_dict())
            if overwrite:
                _redis(redis_client.hset, REDIS_TOPICS_KEY, self.name, value)
            else:
                _redis(redis_client.hsetnx, REDIS_TOPICS_KEY, self.name, value)
        finally:
            if own:
                redis_client.close()


def _resolve_type(name: str | None) -> type | None:
    """Find a registered Data subclass by tag, by class path, or by last path part."""
    if name is None:
        return None
    from .data import get_data_type, registered_data_types

    found = get_data_type(name)
    if found is not None:
        return found
    for cls in registered_data_types().values():
        if f"{cls.__module__}.{cls.__qualname__}" == name:
            return cls
    return get_data_type(name.rsplit(".", 1)[-1]) if "." in name else None


def _redis(fn: Any, *args: Any) -> Any:
    """Call a redis-py method, translating its exceptions into ours."""
    try:
        return fn(*args)
    except MsightError:
        raise
    except Exception as exc:
        from redis import exceptions as rex  # a redis-py client implies redis-py

        if isinstance(exc, (rex.AuthenticationError, rex.AuthorizationError)):
            raise AuthenticationError(f"Redis refused the credentials: {exc}") from exc
        if isinstance(exc, (rex.ConnectionError, rex.TimeoutError)):
            raise BrokerUnavailableError(f"Redis is unreachable: {exc}") from exc
        if isinstance(exc, rex.RedisError):
            raise BrokerError(f"Redis error on the topic registry: {exc}") from exc
        raise


def _load(raw: Any, name: str) -> Topic:
    try:
        if isinstance(raw, (bytes, bytearray)):
            raw = raw.decode("utf-8")
        return Topic.from_dict(json.loads(raw))
    except (ValueError, InvalidTopicError) as exc:
        raise InvalidTopicError(f"registry entry of topic {name!r} is malformed: {exc}") from exc


def get_topic(
    redis_client: Any,
    topic_name: str,
    register_if_not_exist: bool = False,
    data_type: Any = None,
    description: str | None = None,
) -> Topic:
    """Look a topic up in the Redis registry, registering it if asked.

    Registration is atomic (``HSETNX``): when two nodes register the same topic at
    once, both get the entry that won. Blocks for one or two round trips.

    Args:
        redis_client: a ``redis.Redis`` (e.g. :func:`msight_core.utils.get_redis_client`).
        topic_name: the portable topic name.
        register_if_not_exist: create the entry when it is missing.
        data_type: the :class:`~msight_core.data.Data` subclass (or its tag) to
            register; required with ``register_if_not_exist``.
        description: free text stored with a new entry.

    Raises:
        InvalidTopicError: the name is not portable, or the stored entry is malformed.
        TopicNotFoundError: no entry and ``register_if_not_exist`` is false.
        ConfigError: ``register_if_not_exist`` without ``data_type``.
        BrokerUnavailableError: Redis cannot be reached.
        BrokerError: Redis refused a command.
    """
    validate_topic_name(topic_name)
    raw = _redis(redis_client.hget, REDIS_TOPICS_KEY, topic_name)
    if raw is None:
        if not register_if_not_exist:
            raise TopicNotFoundError(
                f"topic {topic_name!r} is not in the registry ({REDIS_TOPICS_KEY}); pass "
                "register_if_not_exist=True with a data_type to create it"
            )
        if data_type is None:
            raise ConfigError("data_type is required when register_if_not_exist is True")
        topic = Topic(topic_name, data_type, description)
        if _redis(redis_client.hsetnx, REDIS_TOPICS_KEY, topic_name, json.dumps(topic.to_dict())):
            logger.info("registered topic %r (%s)", topic_name, topic.data_type)
            return topic
        raw = _redis(redis_client.hget, REDIS_TOPICS_KEY, topic_name)
        if raw is None:  # deleted between the two calls: ours is as good as any
            return topic
    topic = _load(raw, topic_name)
    if data_type is not None:
        wanted = Topic(topic_name, data_type).data_type
        if topic.data_type != wanted:
            logger.warning(
                "topic %r is registered with data type %r, not %r; using the registry's",
                topic_name,
                topic.data_type,
                wanted,
            )
    return topic


def list_topics(redis_client: Any) -> dict[str, Topic]:
    """Every topic in the registry, by name (malformed entries are logged and skipped).

    Raises:
        BrokerUnavailableError: Redis cannot be reached.
        BrokerError: Redis refused the command.
    """
    out: dict[str, Topic] = {}
    for key, raw in _redis(redis_client.hgetall, REDIS_TOPICS_KEY).items():
        name = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        try:
            out[name] = _load(raw, name)
        except InvalidTopicError as exc:
            logger.warning("%s", exc)
    return out
