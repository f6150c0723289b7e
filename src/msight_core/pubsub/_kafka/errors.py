"""confluent-kafka errors, translated once into the msight error tree.

:func:`translate` maps a ``KafkaException`` or ``KafkaError`` to
``AuthenticationError``, ``BrokerUnavailableError``, ``PayloadTooLargeError``,
``ConfigError`` or ``BrokerError``; callers raise the result ``from`` the
original. :func:`kafka_error`, :func:`code_of`, :func:`is_fatal` and
:func:`fatal_error` read the ``KafkaError`` an exception carries, and
:data:`PRODUCER_LOST` / :data:`TOPIC_MISSING` group the codes the publisher
recovers from.
"""

from __future__ import annotations

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
    "PRODUCER_LOST",
    "TOPIC_MISSING",
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
