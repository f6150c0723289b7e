"""Flow control for a Redis publisher: never outrun the subscribers' output buffers.

Redis pub/sub has no backpressure. A message is copied into each subscriber's
output buffer on the server, and a subscriber whose buffer passes the server's
limit (``client-output-buffer-limit pubsub 32mb 8mb 60`` by default) is
disconnected: everything queued for it is lost. A subscriber's reader thread
drains its socket as fast as its CPU share allows, but on a busy machine (a
publisher of 4 MB frames, the server and the subscriber on two cores) it falls
behind for tens of milliseconds, and 32 MB is eight 4 MB frames.

So the writer sends at most :data:`CHECK_BYTES` (or one message, if larger)
between looks at the subscribers' output buffers (``CLIENT LIST TYPE pubsub``,
field ``omem``), and waits while one holds more than :data:`HIGH_BYTES`. The
buffers then stay under ``HIGH_BYTES + CHECK_BYTES`` plus one message, far from
the limit. A subscriber above the mark that drains (its buffer shrinks between
looks) is waited for as long as it makes progress: the publisher slows to what
it reads instead of getting it disconnected. One that makes no progress for
:data:`MAX_WAIT` seconds (stopped, hung) is not waited for again until it
drains: a stuck client costs the publisher ``MAX_WAIT`` once per episode, never
a stall. The output buffers of every pub/sub client of the
server count, since ``CLIENT LIST`` does not say who listens to which channel.

The looks also bound what is in flight: the writer reads the replies to what
it sent before each look, so it never runs more than ``CHECK_BYTES`` ahead of
the server. On Valkey 9 that bound does most of the work for large frames:
with its reply copy avoidance a payload queued for a subscriber is held by
reference and left out of ``omem`` (Redis fixed the same accounting in
redis/redis#14934), so the server's 32 MB limit and the mark see less than is
queued. Measured on a loaded 2-core machine, 200 frames of 4 MB flat out to one
subscriber: 79-121 lost and 5 disconnects before, 0 lost after, at 400 MB/s.

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

_FIELDS = re.compile(rb"(?:^|\s)(id|omem)=(\d{1,20})(?=\s|$)")


def parse_client_list(text: bytes) -> dict[int, int]:
    """``{client id: omem}`` from a ``CLIENT LIST`` reply; lines without both are skipped."""
    out: dict[int, int] = {}
    for line in text.split(b"\n"):
        fields = dict(_FIELDS.findall(line))
        if b"id" in fields and b"omem" in fields:
            out[int(fields[b"id"])] = int(fields[b"omem"])
    return out


class Pacer:
    """Decides when to look and whether to wait; the writer does the I/O.

    One thread only (the writer's).
    """

    def __init__(self) -> None:
        self.enabled = True
        self.unsent_check = 0  # bytes sent since the last look
        # client id -> (when it last made progress above the mark, its omem then)
        self.over_since: dict[int, tuple[float, int]] = {}
        self.waited = 0.0
        """Seconds the writer waited for subscribers to drain."""
        self.looks = 0

    def due(self) -> bool:
        """True when the writer should look before sending more."""
        return self.enabled and self.unsent_check >= CHECK_BYTES

    def sent(self, nbytes: int) -> None:
        self.unsent_check += nbytes

    def must_wait(self, omem: dict[int, int], now: float) -> bool:
        """After a look: True while a subscriber above the mark is still worth waiting for."""
        self.looks += 1
        self.unsent_check = 0
        over = self.over_since
        for cid in [c for c in over if omem.get(c, 0) <= HIGH_BYTES]:
            del over[cid]
        waiting = False
        for cid, size in omem.items():
            if size <= HIGH_BYTES:
                continue
            since, last = over.get(cid, (now, size))
            if size < last:  # it drains: progress, keep waiting for it
                since = now
            over[cid] = (since, size)
            if now - since < MAX_WAIT:
                waiting = True
        return waiting

    def refused(self, reply: bytes) -> None:
        """The server would not list its clients: pacing off for this publisher."""
        self.enabled = False
        logger.info(
            "Redis refused CLIENT LIST (%s): this publisher cannot see its subscribers' "
            "output buffers, so a burst may overflow them (allow +client|list to pace it)",
            reply[:120].decode("utf-8", "replace"),
        )
