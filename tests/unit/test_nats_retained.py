"""What a NATS publisher keeps of its large frames for queue-group members
(:class:`msight_core.pubsub._nats.chunks.Retained`), on a controlled clock."""

from __future__ import annotations

from typing import Any

import pytest

from msight_core.pubsub._nats import chunks
from msight_core.pubsub._nats.chunks import (
    ASKED_SECONDS,
    GRACE_SECONDS,
    RETAIN_BYTES,
    RETAIN_SECONDS,
    Retained,
)

MiB = 1024 * 1024


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(chunks.time, "monotonic", lambda: now[0])
    return now


def _kept(retained: Retained, seqs: Any) -> list[int]:
    return [seq for seq in seqs if retained.topic(seq) is not None]


def test_a_burst_above_retain_bytes_waits_for_its_first_request(clock: list[float]) -> None:
    """6 x 16 MB published at once, before any member could ask: all kept."""
    retained = Retained(256 * MiB)
    frames = {seq: bytes([seq]) * (16 * MiB) for seq in range(1, 7)}
    for seq, data in frames.items():
        retained.add(seq, data, "camera")
        clock[0] += 0.001
    assert 6 * 16 * MiB > RETAIN_BYTES
    clock[0] += GRACE_SECONDS / 2  # the first request, a round trip later
    assert [retained.take(seq) for seq in frames] == list(frames.values())
    assert retained.refused == 0


def test_unrequested_frames_fall_back_to_retain_bytes_after_the_grace(
    clock: list[float],
) -> None:
    """A topic nobody asks for holds at most RETAIN_BYTES once its frames are
    older than the grace: what a publisher nobody asks holds stays small."""
    retained = Retained(256 * MiB)
    for seq in range(1, 9):
        retained.add(seq, b"x" * (16 * MiB), "t")
        clock[0] += 0.001
    assert _kept(retained, range(1, 9)) == list(range(1, 9))  # within the grace
    clock[0] += GRACE_SECONDS + 0.01
    retained.add(9, b"y" * (16 * MiB), "t")
    assert RETAIN_BYTES == 64 * MiB
    assert _kept(retained, range(1, 10)) == [6, 7, 8, 9]
    assert retained.take(9) is not None
    assert retained.take(1) is None


def test_memory_never_exceeds_max_bytes_even_within_the_grace(clock: list[float]) -> None:
    retained = Retained(128 * MiB)
    for seq in range(1, 21):
        retained.add(seq, b"z" * (16 * MiB), "t")
    assert retained._bytes <= 128 * MiB
    assert _kept(retained, range(1, 21)) == list(range(13, 21))


def test_requests_keep_frames_up_to_max_bytes_and_age_still_ends_them(
    clock: list[float],
) -> None:
    retained = Retained(256 * MiB)
    retained.add(1, b"a" * MiB, "t")
    assert retained.take(1) is not None  # a member asks: up to max_bytes now
    for seq in range(2, 12):
        clock[0] += GRACE_SECONDS + 0.01  # each older than the grace
        retained.add(seq, b"b" * (16 * MiB), "t")
    assert clock[0] < 1000.0 + ASKED_SECONDS
    assert _kept(retained, range(1, 12)) == list(range(1, 12))
    clock[0] += RETAIN_SECONDS + 0.01
    assert retained.take(11) is None  # too old, even the last one
    assert retained.refused == 1
