"""Wildcard patterns (NATS semantics), as every backend and the CLI read them."""

from __future__ import annotations

import pytest

from msight_core.errors import InvalidTopicError
from msight_core.topics import (
    Topic,
    subscription_name,
    topic_filter,
    topic_matcher,
    validate_topic_pattern,
)


@pytest.mark.parametrize(
    ("pattern", "topic", "covered"),
    [
        ("camera1.*", "camera1.frames", True),
        ("camera1.*", "camera1.frames.raw", False),
        ("camera1.*", "camera1", False),
        ("camera1.>", "camera1.frames", True),
        ("camera1.>", "camera1.frames.raw", True),
        ("camera1.>", "camera1", False),
        ("camera1.>", "camera10.frames", False),
        ("site.*.frames", "site.cam-2.frames", True),
        ("site.*.frames", "site.cam.2.frames", False),
        ("a.b", "a.b", True),
        ("a.b", "aXb", False),  # the dot is literal
    ],
)
def test_matcher_is_exact_per_token(pattern: str, topic: str, covered: bool) -> None:
    assert bool(topic_matcher(pattern).fullmatch(topic)) is covered
    assert topic_filter([pattern])(topic) is covered


@pytest.mark.parametrize(
    "bad", ["*", ">", "a.>.b", "a..b", "a.b*", "_INBOX.>", "_msight.x.*", "", "a." * 130 + "*"]
)
def test_malformed_or_reserved_patterns_are_refused(bad: str) -> None:
    with pytest.raises(InvalidTopicError):
        validate_topic_pattern(bad)
    with pytest.raises(InvalidTopicError):
        topic_filter([bad])


def test_subscription_name_takes_names_topics_and_patterns() -> None:
    assert subscription_name("camera1.>") == "camera1.>"
    assert subscription_name("camera1.frames") == "camera1.frames"
    assert subscription_name(Topic(name="camera1.frames")) == "camera1.frames"
    with pytest.raises(InvalidTopicError):
        subscription_name("camera 1")
    with pytest.raises(InvalidTopicError):
        subscription_name(42)


def test_filter_mixes_names_and_patterns() -> None:
    covers = topic_filter(["lidar1.points", "camera1.*"])
    assert covers("lidar1.points") and covers("camera1.frames")
    assert not covers("lidar1.points.raw") and not covers("camera2.frames")
