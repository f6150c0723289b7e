"""Topics: names that work on every broker, and the :class:`Topic` value.

A topic name must be portable across Redis channels, NATS subjects and Kafka
topics, so that switching ``MSIGHT_PUBSUB_BACKEND`` never breaks a deployment:
1 to 249 characters of ``A-Za-z0-9._-``, with no empty token between dots
(Kafka's limit on length and characters, NATS's rule on tokens).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import InvalidTopicError

__all__ = ["Topic", "MAX_TOPIC_LENGTH", "topic_name", "validate_topic_name"]

MAX_TOPIC_LENGTH = 249
_TOPIC_RE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")


def validate_topic_name(name: str) -> str:
    """Return ``name`` if it is portable across all brokers.

    Raises:
        InvalidTopicError: the name is empty, too long, or has other characters.
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
    return name


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
            object.__setattr__(self, "data_type", getattr(self.data_type, "__name__", None))

    def __str__(self) -> str:
        return self.name
