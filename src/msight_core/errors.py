"""The msight_core error tree.

Every error the public API raises on purpose derives from :class:`MsightError`.
Client-library exceptions (redis-py, nats-py, confluent-kafka) are translated once,
at each backend's boundary, with ``raise ... from exc`` so the cause stays visible
for debugging but callers only ever need to catch our types::

    MsightError
    ├── ConfigError                 (also ValueError)   bad MSIGHT_* value or argument
    ├── MissingDependencyError      (also ImportError)  backend extra not installed
    ├── ClosedError                 (also RuntimeError) used after close()
    ├── InvalidTopicError           (also ValueError)   name not portable across brokers
    ├── TopicNotFoundError          (also LookupError)  not in the topic registry
    ├── PayloadTooLargeError        (also ValueError)   no way to carry this frame
    ├── SerializationError                              Data could not be encoded
    │   └── DeserializationError    (also ValueError)   bytes are not a valid Data message
    └── BrokerError                                     anything the broker side did
        ├── BrokerUnavailableError                      broker unreachable or connection lost
        │   └── AuthenticationError                     credentials refused
        ├── PermissionDeniedError                       broker ACL refuses this topic to us
        ├── ShardedPubSubUnsupportedError               Redis Cluster without SPUBLISH (< 7)
        ├── PublishError                                delivery failed after acceptance
        └── BackpressureError                           outage buffer full / publish timed out

Wrong *types* (a ``str`` payload, say) raise the builtin :class:`TypeError`, as Python
code conventionally does; everything else is one of the classes above.

``BrokerUnavailableError`` deliberately does not derive from the builtin
``ConnectionError`` (an ``OSError``): callers catching ``OSError`` around file I/O
should not swallow broker outages by accident.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BackpressureError",
    "BrokerError",
    "BrokerUnavailableError",
    "ClosedError",
    "ConfigError",
    "DeserializationError",
    "InvalidTopicError",
    "MissingDependencyError",
    "MsightError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PublishError",
    "SerializationError",
    "ShardedPubSubUnsupportedError",
    "TopicNotFoundError",
]


class MsightError(Exception):
    """Base class of every error msight_core raises on purpose."""


class ConfigError(MsightError, ValueError):
    """A configuration value (environment variable or argument) is invalid."""


class MissingDependencyError(MsightError, ImportError):
    """An optional extra needed by the chosen backend is not installed."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(
            f"the {extra!r} backend needs the {package!r} package: "
            f"pip install 'msight-core[{extra}]'"
        )
        self.package = package
        self.extra = extra


class ClosedError(MsightError, RuntimeError):
    """The backend (or node) was closed; it cannot publish or subscribe any more."""


class InvalidTopicError(MsightError, ValueError):
    """A topic name is not portable across Redis, NATS and Kafka."""


class TopicNotFoundError(MsightError, LookupError):
    """A topic is not in the registry and registration was not requested."""


class PayloadTooLargeError(MsightError, ValueError):
    """The payload cannot be carried by this broker as configured."""


class SerializationError(MsightError):
    """A :class:`~msight_core.data.Data` value could not be serialized."""


class DeserializationError(SerializationError, ValueError):
    """Bytes are not a valid message for the requested data type."""


class BrokerError(MsightError):
    """Base of errors that originate from the broker or the connection to it."""


class BrokerUnavailableError(BrokerError):
    """The broker cannot be reached (refused, timed out, or connection lost)."""


class AuthenticationError(BrokerUnavailableError):
    """The broker refused the configured credentials."""


class PermissionDeniedError(BrokerError):
    """The broker's access rules (ACL, permissions) refuse this topic to these credentials.

    Raised by ``subscribe()``; a refused publish is reported as a
    :class:`PublishError` whose cause is this error.
    """


class ShardedPubSubUnsupportedError(BrokerError):
    """The Redis Cluster's servers lack ``SPUBLISH``/``SSUBSCRIBE`` (Redis < 7)."""


class PublishError(BrokerError):
    """A message that ``publish()`` accepted could not be delivered to the broker."""


class BackpressureError(BrokerError):
    """A bounded buffer is full (for example during an outage) and the wait timed out."""
