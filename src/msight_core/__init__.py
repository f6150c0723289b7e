"""msight_core: MSight pub/sub for roadside sensing.

Importing this package connects to nothing, reads no environment variable and
imports no broker client; backends load when first used.
"""

from __future__ import annotations

from .errors import (
    AuthenticationError,
    BackpressureError,
    BrokerError,
    BrokerUnavailableError,
    ClosedError,
    ConfigError,
    DeserializationError,
    InvalidTopicError,
    MissingDependencyError,
    MsightError,
    PayloadTooLargeError,
    PublishError,
    SerializationError,
    TopicNotFoundError,
)
from .pubsub import PubSubBackend, get_pubsub
from .topics import Topic

__version__ = "0.1.0"

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
    "PubSubBackend",
    "PublishError",
    "SerializationError",
    "Topic",
    "TopicNotFoundError",
    "__version__",
    "get_pubsub",
]
