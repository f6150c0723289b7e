"""msight_core: MSight pub/sub for roadside sensing.

Importing this package connects to nothing, reads no environment variable and
imports no broker client; backends load when first used.

Logging: every module logs to a logger under ``msight_core``, which carries a
``NullHandler``; the library never configures logging. An application decides
where records go (``logging.basicConfig(...)``). Two places act as the
application: a node's ``spin()`` adds a plain stderr handler to the root logger
only when it has none (a bare node script shows its log; a configured
application is left alone), and the ``msight`` command line logs to stderr
(more with ``-v``).
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

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

try:
    __version__: str = version("msight-core")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

logging.getLogger(__name__).addHandler(logging.NullHandler())

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
