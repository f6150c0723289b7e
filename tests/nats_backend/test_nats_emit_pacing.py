"""The writer's pacing of large frames (``_nats.emit._pace``).

Frames whose subscribers confirm them are paced by those confirmations
(``_nats.flow``); the server's PING round trips pace the others. The burst
tests (``test_nats_burst.py``) check that neither way loses a frame against a
real nats-server; these check which wait applies.
"""

from __future__ import annotations

import asyncio

from msight_core.pubsub._nats import emit


class _Wire:
    """What ``_pace`` uses of ``internals.Wire``; round trips end when released."""

    def __init__(self, peer_paced: bool) -> None:
        self.peer_paced = peer_paced
        self.pong: asyncio.Future[None] | None = None
        self.unconfirmed = emit.PACE_BYTES
        self.trips = 0
        self.release = asyncio.Event()

    async def round_trip(self) -> None:
        self.trips += 1
        self.unconfirmed = 0
        await self.release.wait()


def test_frames_their_subscribers_pace_wait_for_no_round_trip() -> None:
    async def main() -> None:
        wire = _Wire(peer_paced=True)
        for _ in range(5):
            wire.unconfirmed = emit.PACE_BYTES
            await asyncio.wait_for(emit._pace(wire), 1.0)  # never released: must not wait
            assert wire.unconfirmed == 0
        assert wire.trips == 0

    asyncio.run(main())


def test_other_frames_wait_for_the_previous_windows_round_trip() -> None:
    async def main() -> None:
        wire = _Wire(peer_paced=False)
        await asyncio.wait_for(emit._pace(wire), 1.0)  # the first window: a PING, no wait
        second = asyncio.ensure_future(emit._pace(wire))
        await asyncio.sleep(0.05)
        assert not second.done()  # held until the first window's PONG
        wire.release.set()
        await asyncio.wait_for(second, 1.0)
        assert wire.trips == 2

    asyncio.run(main())
