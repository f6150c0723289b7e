"""confluent-kafka errors, translated once into the msight error tree.

:func:`translate` maps a ``KafkaException`` or ``KafkaError`` to
``AuthenticationError``, ``BrokerUnavailableError``, ``PayloadTooLargeError``,
``ConfigError`` or ``BrokerError``; callers raise the result ``from`` the
original. :func:`kafka_error`, :func:`code_of`, :func:`is_fatal` and
:func:`fatal_error` read the ``KafkaError`` an exception carries, and
:data:`PRODUCER_LOST` / :data:`TOPIC_MISSING` group the codes the publisher
recovers from; :class:`EpochWatch` notices, from a producer's statistics, a
broker that keeps rejecting its producer id.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from ...errors import (
    AuthenticationError,
    BrokerError,
    BrokerUnavailableError,
    ConfigError,
    MsightError,
    PayloadTooLargeError,
)

__all__ = [
    "EPOCH_BUMPS",
    "PRODUCER_LOST",
    "TOPIC_MISSING",
    "EpochWatch",
    "code_of",
    "fatal_error",
    "is_fatal",
    "kafka_error",
    "translate",
]

#: Reported for messages a replaced (fatal) producer had not delivered: re-produce them.
PRODUCER_LOST = frozenset(
    {
        KafkaError._FATAL,
        KafkaError._FENCED,
        KafkaError._PURGE_QUEUE,
        KafkaError._PURGE_INFLIGHT,
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.INVALID_PRODUCER_EPOCH,
    }
)
#: The topic does not exist (yet, or any more).
TOPIC_MISSING = frozenset(
    {
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
    }
)

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
_CONFIG = {KafkaError._INVALID_ARG, KafkaError.INVALID_CONFIG}


def kafka_error(exc: BaseException) -> Any:
    """The ``KafkaError`` ``exc`` is or carries, else ``None``."""
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return exc.args[0]
    return exc if isinstance(exc, KafkaError) else None


def code_of(exc: BaseException) -> Any:
    """The librdkafka error code of ``exc`` (``None`` if it carries no ``KafkaError``)."""
    err = kafka_error(exc)
    return None if err is None else err.code()


def is_fatal(err: Any) -> bool:
    """True if the ``KafkaError`` ``err`` says its client failed for good."""
    return bool(err.fatal()) or err.code() in (KafkaError._FATAL, KafkaError._FENCED)


def fatal_error(exc: BaseException) -> Any:
    """The ``KafkaError`` of ``exc`` if it says its client failed for good, else ``None``."""
    err = kafka_error(exc)
    return err if err is not None and is_fatal(err) else None


def translate(exc: BaseException, what: str) -> MsightError:
    """The msight error for a confluent-kafka exception or ``KafkaError``.

    ``what`` says what was being done (``"subscribing to 'cam'"``); the result
    carries the librdkafka reason, which never contains credentials. An
    ``MsightError`` is returned as it is.
    """
    if isinstance(exc, MsightError):
        return exc
    err = kafka_error(exc)
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
    if code in _CONFIG:
        return ConfigError(text)
    return BrokerError(text)


#: Epoch bumps per statistics interval that mean the broker rejects our producer id.
EPOCH_BUMPS = 3


class EpochWatch:
    """Notices a producer whose epoch keeps being bumped (from its statistics).

    librdkafka answers UNKNOWN_PRODUCER_ID without risk of duplicates by bumping
    the epoch locally; a real Kafka accepts that once. A broker that lost the
    producer id for good (tansu after a restart) rejects every epoch, so the
    producer loops until ``message.timeout.ms``: ``on_rejected(reason)`` is
    called then, and the publisher replaces the producer.
    """

    def __init__(self, on_rejected: Callable[[str], None]) -> None:
        self.on_rejected = on_rejected
        self.pid = -1
        self.epoch = -1
        self.bumping = 0
        self.retired = False

    def __call__(self, stats_json: str) -> None:
        try:
            eos = json.loads(stats_json).get("eos") or {}
            pid, epoch = int(eos.get("producer_id", -1)), int(eos.get("producer_epoch", -1))
        except (ValueError, TypeError, AttributeError):
            return
        bumped = epoch - self.epoch if pid == self.pid and pid >= 0 and self.epoch >= 0 else 0
        self.pid, self.epoch = pid, epoch
        self.bumping = self.bumping + 1 if bumped > 0 else 0
        if not self.retired and (bumped >= EPOCH_BUMPS or self.bumping >= 2):
            self.on_rejected(
                f"the broker keeps rejecting producer id {pid} (epoch bumped to {epoch}): "
                "it lost the producer's idempotence state"
            )
