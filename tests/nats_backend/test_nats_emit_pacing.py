"""The writer's pacing of large messages (``_nats.emit``).

Frames whose subscribers confirm them are handed over as ``Paced`` pieces and
paced by those confirmations (``_nats.flow``); the server's PING round trips
pace the other large messages. The burst tests (``test_nats_burst.py``) check
that neither way loses a frame against a real nats-server; these check which
wait applies to what.
"""

from __future__ import annotations

import asyncio

from msight_core.pubsub._nats import emit


class _Wire:
    """What ``emit`` uses of ``internals.Wire``; round trips end when released."""

    def __init__(self) -> None:
        self.pong: asyncio.Future[None] | None = None
        self.unconfirmed = 0
        self.pending_bytes = 0
        self.trips = 0
        self.written: list[bytes] = []
        self.release = asyncio.Event()

    async def write(self, commands: bytes) -> None:
        self.written.append(commands)

    async def write_message(self, pieces: tuple[bytes, ...]) -> None:
        self.written.append(b"".join(pieces))

    async def flush(self, force: bool) -> None:
        pass

    async def round_trip(self) -> None:
        self.trips += 1
        self.unconfirmed = 0
        await self.release.wait()


def _frame(tag: bytes) -> tuple[bytes, ...]:
    """A 4 MiB message in pieces (one window of PACE_BYTES)."""
    return (tag, bytes(emit.PACE_BYTES - len(tag)))


def test_frames_their_subscribers_pace_wait_for_no_round_trip() -> None:
    async def main() -> None:
        wire = _Wire()
        out = [emit.Paced(_frame(b"%d" % i)) for i in range(5)]
        await asyncio.wait_for(emit.emit(wire, out), 1.0)  # round trips never end: no wait
        assert wire.trips == 0
        assert wire.unconfirmed == 0
        assert [w[:1] for w in wire.written] == [b"0", b"1", b"2", b"3", b"4"]

    asyncio.run(main())


def test_other_large_messages_wait_for_the_previous_windows_round_trip() -> None:
    async def main() -> None:
        wire = _Wire()
        # A batch may mix topics: a frame nobody confirms among paced ones.
        out = [emit.Paced(_frame(b"a")), _frame(b"b"), emit.Paced(_frame(b"c")), _frame(b"d")]
        task = asyncio.ensure_future(emit.emit(wire, out))
        await asyncio.sleep(0.05)
        # "b" sent a PING without waiting (no window before it); "d" waits for it.
        assert not task.done()
        assert wire.trips == 2
        assert [w[:1] for w in wire.written] == [b"a", b"b", b"c", b"d"]
        wire.release.set()
        await asyncio.wait_for(task, 1.0)

    asyncio.run(main())
