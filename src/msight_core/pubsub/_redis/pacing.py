"""Flow control for a Redis publisher: never outrun the subscribers' output buffers.

Redis pub/sub has no backpressure. A message is copied into each subscriber's
output buffer on the server, and a subscriber whose buffer passes the server's
limit (``client-output-buffer-limit pubsub 32mb 8mb 60`` by default) is
disconnected: everything queued for it is lost. A subscriber's reader thread
drains its socket as fast as its CPU share allows, but on a busy machine (a
publisher of 4 MB frames, the server and the subscriber on two cores) it falls
behind for tens of milliseconds, and 32 MB is eight 4 MB frames.

So the writer sends at most :data:`CHECK_BYTES` (or one message, if larger)
between looks at the subscribers (``CLIENT LIST TYPE pubsub``), and waits while
one is more than :data:`HIGH_BYTES` behind. It then stays under ``HIGH_BYTES +
CHECK_BYTES`` plus one message behind, far from the limit.

How far behind: the server's ``omem`` alone is not enough. Valkey 9 holds a
large payload queued for a subscriber by reference (reply copy avoidance) and
leaves it out of ``omem`` while the subscriber's socket is full; once the
subscriber reads again the server counts everything queued at once and, past
32 MB, disconnects it. Measured: a subscriber that stopped reading showed 2 MB
of ``omem`` with 60 MB queued for it, and was cut off on its next read. So where
the server reports ``tot-net-out`` (bytes written to the client, in Valkey 9
here) a subscriber's lag is the larger of its ``omem`` and what this publisher
sent since the subscriber was last seen caught up (``omem`` 0) less what the
server wrote to it since. Where it does not, ``omem`` is used alone.

A subscriber behind the mark is waited for as long as it makes progress (the
server wrote more to it, or its ``omem`` shrank): the publisher slows to what
it reads instead of getting it disconnected. One that makes no progress for
:data:`MAX_WAIT` seconds (stopped, hung) is not waited for again until it reads
again or catches up: a stuck client costs the publisher ``MAX_WAIT`` once per
episode, never a stall. Every pub/sub client of the server counts, since
``CLIENT LIST`` does not say who listens to which channel: a subscriber that
stays behind on another publisher's channel slows this publisher too.

The looks also bound what is in flight: the writer reads the replies to what
it sent before each look, so it never runs more than ``CHECK_BYTES`` ahead of
the server. Measured on a loaded 2-core machine, 200 frames of 4 MB flat out
to one subscriber: 79-121 lost and 5 disconnects before pacing, 0 lost after,
at 400 MB/s.

A server that refuses ``CLIENT LIST`` (an ACL without ``+client|list``, a renamed
command) turns pacing off for that publisher, logged once; nothing else changes.
"""

from __future__ import annotations

import logging
import re

__all__ = ["CHECK_BYTES", "HIGH_BYTES", "MAX_WAIT", "Pacer", "parse_client_list"]

logger = logging.getLogger("msight_core.pubsub.redis")

#: Bytes sent between two looks at the subscribers' output buffers.
CHECK_BYTES = 4 * 1024 * 1024
#: A subscriber holding more than this on the server is waited for.
HIGH_BYTES = 8 * 1024 * 1024
#: Seconds a subscriber above the mark that makes no progress is waited for, per episode.
MAX_WAIT = 0.5
#: Seconds between looks while waiting.
POLL = 0.001
#: Command sent to look (RESP2).
QUERY = b"*4\r\n$6\r\nCLIENT\r\n$4\r\nLIST\r\n$4\r\nTYPE\r\n$6\r\npubsub\r\n"

_FIELDS = re.compile(rb"(?:^|\s)(id|omem|tot-net-out)=(\d{1,20})(?=\s|$)")


def parse_client_list(text: bytes) -> dict[int, tuple[int, int]]:
    """``{client id: (omem, tot-net-out)}`` from a ``CLIENT LIST`` reply.

    ``tot-net-out`` is -1 where the server does not report it; lines without
    both ``id`` and ``omem`` are skipped."""
    out: dict[int, tuple[int, int]] = {}
    for line in text.split(b"\n"):
        fields = dict(_FIELDS.findall(line))
        if b"id" in fields and b"omem" in fields:
            out[int(fields[b"id"])] = (int(fields[b"omem"]), int(fields.get(b"tot-net-out", -1)))
    return out


class Pacer:
    """Decides when to look and whether to wait; the writer does the I/O.

    One thread only (the writer's).
    """

    def __init__(self) -> None:
        self.enabled = True
        self.unsent_check = 0  # bytes sent since the last look
        self.sent_total = 0  # bytes sent by this publisher, ever
        # client id -> (sent_total, its tot-net-out) when it was last seen caught up
        self.caught_up: dict[int, tuple[int, int]] = {}
        # client id -> (when it last made progress behind the mark, its omem and
        # tot-net-out at the last look)
        self.over_since: dict[int, tuple[float, int, int]] = {}
        self.waited = 0.0
        """Seconds the writer waited for subscribers to drain."""
        self.looks = 0

    def due(self) -> bool:
        """True when the writer should look before sending more."""
        return self.enabled and self.unsent_check >= CHECK_BYTES

    def sent(self, nbytes: int) -> None:
        self.unsent_check += nbytes
        self.sent_total += nbytes

    def lag(self, cid: int, omem: int, written: int) -> int:
        """Bytes client ``cid`` is behind, by this look (see the module docs)."""
        if written < 0:  # the server does not say what it wrote: omem is exact there
            return omem
        base = self.caught_up.get(cid)
        if omem == 0 or base is None:
            self.caught_up[cid] = (self.sent_total, written)
            return omem
        return max(omem, (self.sent_total - base[0]) - (written - base[1]))

    def must_wait(self, clients: dict[int, tuple[int, int]], now: float) -> bool:
        """After a look (``{id: (omem, tot-net-out)}``, see :func:`parse_client_list`):
        True while a subscriber behind the mark is still worth waiting for."""
        self.looks += 1
        self.unsent_check = 0
        for cid in [c for c in self.caught_up if c not in clients]:
            del self.caught_up[cid]  # gone
        over = self.over_since
        waiting = False
        for cid, (size, written) in clients.items():
            if self.lag(cid, size, written) <= HIGH_BYTES:
                over.pop(cid, None)
                continue
            since, last_size, last_written = over.get(cid, (now, size, written))
            if size < last_size or written > last_written:  # it reads: keep waiting
                since = now
            over[cid] = (since, size, written)
            if now - since < MAX_WAIT:
                waiting = True
        for cid in [c for c in over if c not in clients]:
            del over[cid]
        return waiting

    def refused(self, reply: bytes) -> None:
        """The server would not list its clients: pacing off for this publisher."""
        self.enabled = False
        logger.info(
            "Redis refused CLIENT LIST (%s): this publisher cannot see its subscribers' "
            "output buffers, so a burst may overflow them (allow +client|list to pace it)",
            reply[:120].decode("utf-8", "replace"),
        )
