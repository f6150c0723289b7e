"""Wildcard patterns (NATS semantics), as every backend and the CLI read them."""

from __future__ import annotations

import itertools
import logging

import pytest

from msight_core.errors import InvalidTopicError
from msight_core.topics import (
    Topic,
    pattern_covers,
    patterns_overlap,
    subscription_name,
    subscription_set,
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


def _patterns() -> list[str]:
    """Every valid pattern of up to 3 tokens over a, b, * and > (literal first token)."""
    found = []
    for n in (1, 2, 3):
        for first in ("a", "b"):
            for rest in itertools.product(("a", "b", "*", ">"), repeat=n - 1):
                tokens = (first, *rest)
                if ">" not in tokens[:-1]:
                    found.append(".".join(tokens))
    return found


def test_covers_and_overlap_agree_with_brute_force() -> None:
    """Checked against every topic of up to 4 tokens over a, b and c (c: any other)."""
    topics = [
        ".".join(t) for n in range(1, 5) for t in itertools.product(("a", "b", "c"), repeat=n)
    ]
    patterns = _patterns()
    matched = {p: {t for t in topics if topic_matcher(p).fullmatch(t) or p == t} for p in patterns}
    for wide, narrow in itertools.product(patterns, repeat=2):
        assert pattern_covers(wide, narrow) == (matched[narrow] <= matched[wide]), (wide, narrow)
        overlap = bool(matched[wide] & matched[narrow])
        assert patterns_overlap(wide, narrow) == overlap, (wide, narrow)


def test_subscription_set_drops_repeats_and_covered_entries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="msight_core.topics"):
        got = subscription_set(
            ["cam.frames", "cam.*", "cam.frames", "cam.left.raw", "cam.>", "gps.fix"]
        )
        assert got == ["cam.>", "gps.fix"]
        assert not caplog.records
        assert subscription_set(["cam.*.raw", "cam.left.*", Topic("x")]) == [
            "cam.*.raw",
            "cam.left.*",
            "x",
        ]
    assert len(caplog.records) == 1 and "overlap" in caplog.records[0].getMessage()
    with pytest.raises(InvalidTopicError):
        subscription_set(["cam.*", "*"])
