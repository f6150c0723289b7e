"""Flow control of large frames over core NATS (:mod:`msight_core.pubsub._nats.flow`):
a publisher paced by the confirmations of its subscribers, and bounded against
subscribers that confirm slowly, stop, or lie."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from msight_core.pubsub._nats import flow
from msight_core.pubsub._nats.flow import Flow, confirmation, parse_confirmation

MiB = 1024 * 1024
ALICE = bytes(range(8))
BOB = bytes(range(8, 16))


def _send(fl: Flow, seqs: range, topic: str = "camera", size: int = 4 * MiB) -> None:
    for seq in seqs:
        fl.sent(seq, topic, size)


async def _timed_room(fl: Flow, topic: str = "camera", size: int = 4 * MiB) -> float:
    started = time.monotonic()
    await fl.room(topic, size)
    return time.monotonic() - started


def test_a_confirmation_is_a_small_checked_text() -> None:
    assert parse_confirmation(confirmation(ALICE, 42)) == (ALICE, 42)
    for forged in (
        b"",
        b"+0001020304050607",  # no frame
        b"+000102030405060 42",  # a short id
        b"+0001020304050607 -1",
        b"+0001020304050607 42 ",
        b"+0001020304050607 " + b"9" * 20,  # past a sequence number's digits
        b"0001020304050607 42",  # a frame request's shape, not a confirmation
        b"+000102030405060G 42",
    ):
        assert parse_confirmation(forged) is None, forged


def test_only_confirmations_that_advance_over_frames_sent_count() -> None:
    fl = Flow(window=8 * MiB)
    _send(fl, range(1, 4))
    fl.confirm(ALICE, 99)  # never sent
    assert fl.ignored == 1 and not fl.paced("camera")
    fl.confirm(ALICE, 2)
    assert fl.paced("camera")
    fl.confirm(ALICE, 1)  # older: no advance
    fl.confirm(ALICE, 2)  # a replay
    assert fl.ignored == 3
    # ALICE is 4 MiB behind (frame 3): another 4 MiB frame fits 8 MiB exactly.
    assert fl._blocking("camera", 4 * MiB, time.monotonic()) == []
    assert len(fl._blocking("camera", 4 * MiB + 1, time.monotonic())) == 1
    assert fl._blocking("other topic", 64 * MiB, time.monotonic()) == []


def test_tracked_subscribers_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flood of ids: at most MAX_PEERS pairs are kept; the rest count for nothing."""
    monkeypatch.setattr(flow, "MAX_PEERS", 8)
    fl = Flow()
    _send(fl, range(1, 2))
    for n in range(20):
        fl.confirm(n.to_bytes(8, "big"), 1)
    assert fl._count == 8 and fl.ignored == 12
    assert sum(len(peers) for peers in fl._peers.values()) == 8


def test_the_window_holds_a_publisher_until_its_subscriber_confirms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(flow, "QUIET", 5.0)  # the wait ends by the confirmation, not silence

    async def main() -> None:
        fl = Flow(window=8 * MiB)
        _send(fl, range(1, 3))
        fl.confirm(ALICE, 1)  # frame 2 outstanding: 4 MiB; a third does fit, a fourth not
        assert await _timed_room(fl) < 0.01
        _send(fl, range(3, 4))
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, fl.confirm, ALICE, 3)
        waited = await _timed_room(fl)
        assert 0.08 < waited < 2.0
        assert fl.waits == 1 and fl.set_aside == 0

    asyncio.run(main())


def test_a_frame_larger_than_the_window_goes_once_all_is_confirmed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(flow, "QUIET", 5.0)

    async def main() -> None:
        fl = Flow(window=8 * MiB)
        _send(fl, range(1, 2), size=16 * MiB)
        fl.confirm(ALICE, 1)
        assert await _timed_room(fl, size=16 * MiB) < 0.01  # nothing outstanding
        _send(fl, range(2, 3), size=16 * MiB)
        asyncio.get_running_loop().call_later(0.05, fl.confirm, ALICE, 2)
        assert 0.03 < await _timed_room(fl, size=16 * MiB) < 2.0

    asyncio.run(main())


def test_a_silent_subscriber_is_not_waited_for() -> None:
    """Gone, killed, or slow to the point of silence: waited for until QUIET after
    its last confirmation, then not at all until it confirms again."""

    async def main() -> None:
        fl = Flow(window=8 * MiB)
        _send(fl, range(1, 10))
        fl.confirm(ALICE, 1)  # 32 MiB behind, and then nothing
        waited = await _timed_room(fl)
        assert flow.QUIET - 0.05 < waited < flow.QUIET + 1.0
        assert await _timed_room(fl) < 0.01
        assert not fl.paced("camera")  # the server's round trips pace the publisher again
        assert fl.set_aside == 0  # silence is not a budget spent

    asyncio.run(main())


def test_a_subscriber_that_keeps_the_publisher_waiting_is_set_aside(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A subscriber that confirms, but slowly (it cannot keep up, or it does so on
    purpose), holds a publisher for BUDGET seconds at most, then is set aside
    and the publisher goes on at once; a subscriber that keeps up is still waited for."""
    monkeypatch.setattr(flow, "BUDGET", 0.3)
    monkeypatch.setattr(flow, "REFILL", 0.0)

    async def main() -> None:
        fl = Flow(window=8 * MiB)
        seq = 0

        def publish() -> None:
            nonlocal seq
            seq += 1
            fl.sent(seq, "camera", 4 * MiB)
            fl.confirm(BOB, seq)  # BOB keeps up

        async def drip() -> None:  # ALICE confirms one frame per 0.1 s
            confirmed = 0
            while True:
                await asyncio.sleep(0.1)
                if confirmed < seq:
                    confirmed += 1
                    fl.confirm(ALICE, confirmed)

        publish()
        fl.confirm(ALICE, 1)
        dripping = asyncio.ensure_future(drip())
        started = time.monotonic()
        for _ in range(30):
            await fl.room("camera", 4 * MiB)
            publish()
        elapsed = time.monotonic() - started
        dripping.cancel()
        assert fl.set_aside == 1
        assert 0.25 < fl.waited < 1.0 and elapsed < 1.5  # not 30 x 0.1 s
        assert not fl.paced("camera")

    with caplog.at_level(logging.WARNING, logger="msight_core.pubsub.nats"):
        asyncio.run(main())
    assert any("kept its large frames waiting" in r.getMessage() for r in caplog.records)
