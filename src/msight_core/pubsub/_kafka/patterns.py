"""Wildcard subscriptions on Kafka: :func:`kafka_regex` and :class:`Patterns`.

An msight pattern (``camera1.*``, ``camera1.>``; see
:func:`msight_core.topics.validate_topic_pattern`) matches whole dot-separated
tokens. A group member subscribes with a Kafka regex subscription (librdkafka
matches the cluster's topics against it at every metadata refresh and the
group rebalances when the set changes); a broadcast subscriber, which assigns
partitions itself, lists the cluster's topics at the same interval and assigns
those that match. Either way a topic that appears later is read from its
start: everything in it is newer than the subscription.

The regex is written for both engines librdkafka may use (POSIX extended
regular expressions or its own): anchored, plain groups, bracket classes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ...topics import topic_matcher, validate_topic_pattern

__all__ = ["Patterns", "kafka_regex"]

_TOKEN = "[A-Za-z0-9_-]+"


def kafka_regex(pattern: str) -> str:
    """The Kafka regex subscription (``^...$``) matching exactly what ``pattern`` does."""
    parts = []
    for token in validate_topic_pattern(pattern).split("."):
        if token == "*":
            parts.append(_TOKEN)
        elif token == ">":
            parts.append(f"{_TOKEN}(\\.{_TOKEN})*")
        else:
            parts.append(re.escape(token))
    return "^" + "\\.".join(parts) + "$"


class Patterns:
    """The patterns a subscriber follows, and the topics that existed before each."""

    def __init__(self) -> None:
        self._matchers: list[re.Pattern[str]] = []
        self._before: set[str] = set()  # topics that existed when a pattern was added

    def __bool__(self) -> bool:
        return bool(self._matchers)

    def add(self, pattern: str, existing: Iterable[str]) -> None:
        """Follow ``pattern``; ``existing``: the cluster's topics right now."""
        matcher = topic_matcher(pattern)
        self._matchers.append(matcher)
        self._before.update(name for name in existing if matcher.fullmatch(name))

    def matches(self, topic: str) -> bool:
        return any(m.fullmatch(topic) for m in self._matchers)

    def is_new(self, topic: str) -> bool:
        """``topic`` matches a pattern and appeared after it was subscribed."""
        return topic not in self._before and self.matches(topic)
