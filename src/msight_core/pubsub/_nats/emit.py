"""How the NATS publisher's writer hands a batch to the connection (not public API).

:func:`emit` writes protocol commands in order through an
:class:`.internals.Wire`: runs of small commands joined into one write, each
large message in its pieces, and large messages *paced*. A flat-out burst of
large frames must not outrun what nats-server holds for a subscriber
(``max_pending``, 64 MB by default; past it the subscriber is disconnected and
loses what was queued): after each :data:`PACE_BYTES` of large payloads the
writer sends a PING and waits for the PONG of the window before, so no more
than two windows are in flight to the server (the socket never idles for a
round trip), and a wait longer than :data:`PACE_SLOW` is waited once more
before writing on. nats-server stalls a producer 2-5 ms per message while a
subscriber's pending output is above 3/4 of ``max_pending``, so a slow round
trip means a subscriber is falling behind (or the machine is too busy for it to
keep up). On an idle machine a 4 MiB round trip takes 1-3 ms: the flat-out rate
is kept.

That second wait is a guess: a PONG tells how far the server has read, not how
far the subscriber has. Frames whose subscribers confirm them (:mod:`.flow`;
the publisher hands them over as :class:`Paced` pieces, and the answers to
frame requests on such topics too) skip the round trips altogether: the
publisher waits for those confirmations instead, before each frame, and what it
has sent and they have not confirmed (the frames on their way to the server
included) stays within :data:`.flow.WINDOW`, under what nats-server holds for a
subscriber. Other large messages in the same batch are paced as before.
Waiting for the server's PONGs as well only kept the socket from carrying more
than two windows: 4 MiB frames flat out to one subscriber went at 420-612 MB/s
with the round trips and 703-738 without them (three alternating pairs, no
loss, no slow consumer either way, nor under two CPU hogs).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .internals import Wire

__all__ = ["PACE_BYTES", "PACE_SLOW", "Paced", "emit", "frame_bytes"]

EMIT_STEP = 4 * 1024 * 1024  # pending in nats-py before the writer waits for the socket
PACE_BYTES = 4 * 1024 * 1024
PACE_SLOW = 0.005
_PACE_WAIT_MAX = 0.05


class Paced(tuple):  # type: ignore[type-arg]
    """The pieces of a large message whose subscribers pace it by their
    confirmations (:mod:`.flow`): no round trip to the server for it."""

    __slots__ = ()


def frame_bytes(pieces: tuple[Any, ...]) -> int:
    """The bytes of a message handed over in pieces."""
    return sum(map(len, pieces))


async def emit(wire: Wire, out: list[Any]) -> None:
    """Hand ``out`` to the connection, in order.

    Runs of small pieces are joined into one write. A tuple (or
    :class:`Paced`) is one large message, handed over in its pieces
    (:meth:`.internals.Wire.write_message`); after it, the writer waits for the
    socket if too much is pending, and large messages other than
    :class:`Paced` ones are paced (``PACE_BYTES``): a flat-out burst must not
    outrun the server's limit on what it holds for a subscriber.
    """
    run: list[bytes] = []
    for piece in out:
        kind = type(piece)
        if kind is not tuple and kind is not Paced:
            run.append(piece)
            continue
        if run:
            await wire.write(b"".join(run))
            run = []
        await wire.write_message(piece)
        if wire.pending_bytes >= EMIT_STEP:
            await wire.flush(force=True)
        if kind is Paced:  # its subscribers' confirmations bound it (.flow)
            continue
        wire.unconfirmed += frame_bytes(piece)
        if wire.unconfirmed >= PACE_BYTES:
            await _pace(wire)
    if run:
        await wire.write(b"".join(run))
    await wire.flush(force=wire.pending_bytes >= EMIT_STEP)


async def _pace(wire: Wire) -> None:
    """A PING for the window just written; then wait for the previous window's
    PONG. Two windows in flight keep the socket busy (waiting for this
    window's PONG would idle it for a round trip per window); a wait longer
    than :data:`PACE_SLOW` means the server holds us back: wait as long again."""
    previous = wire.pong
    wire.pong = asyncio.ensure_future(wire.round_trip())
    if previous is None or previous.done():
        return
    started = time.monotonic()
    await previous
    taken = time.monotonic() - started
    if taken > PACE_SLOW:  # the server (or the machine) holds back
        await asyncio.sleep(min(taken, _PACE_WAIT_MAX))
