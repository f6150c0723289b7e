"""Where the NATS parser's messages go (not public API).

:class:`Hooks` are nats-py's handlers for what the parser does not route
(bound by :mod:`.internals`); a :class:`Route` is a subscription whose plain
messages the parser hands straight to a ``deliver`` function, with the state
that keeps its order when one of its messages took nats-py's path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

__all__ = [
    "KEPT_HEADER",
    "MAX_KEPT",
    "PLAIN_STATUS",
    "SUBJECT_CACHE",
    "Hooks",
    "Route",
    "copy_out",
    "header_values",
]

SUBJECT_CACHE = 4096  # distinct subjects remembered as str per route
PLAIN_STATUS = b"NATS/1.0\r\n"  # a header block without a status code
KEPT_HEADER = b"traceparent"  # a routed message's header block is kept if it has this
MAX_KEPT = 4096  # ... and is at most this long (a peer's headers are untrusted)
VIEW_COPY = 16 * 1024  # from this size, copy through a memoryview (one copy, not two)


class Hooks(Protocol):
    """The client's handlers for what the parser does not route."""

    stats: dict[str, int]

    def process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> Awaitable[None]: ...

    def process_err(self, text: str) -> Awaitable[None]: ...

    def process_ping(self) -> Awaitable[None]: ...

    def process_pong(self) -> Awaitable[None]: ...

    def process_info(self, info: dict[str, Any]) -> Awaitable[None]: ...


def copy_out(buf: bytearray, start: int, stop: int) -> bytes:
    """``bytes(buf[start:stop])``; for large payloads without the intermediate
    bytearray (a 16 MB frame: 2 ms instead of 30 ms here)."""
    if stop - start < VIEW_COPY:
        return bytes(buf[start:stop])
    with memoryview(buf) as view:
        return view[start:stop].tobytes()


class Route:
    """Where a routed subscription's plain messages go, and its ordering state."""

    __slots__ = ("busy", "deliver", "marker", "subjects", "views")

    def __init__(
        self,
        deliver: Callable[[str, bytes, bytes, bytes | None], None],
        marker: bytes | None,
        views: bool = False,
    ) -> None:
        self.deliver = deliver
        self.marker = marker
        # A large payload goes to ``deliver`` as a memoryview of the parser's frame
        # buffer, valid during the call only (the route copies what it keeps).
        self.views = views
        self.busy = 0  # messages handed to the client's path and not yet handled
        self.subjects: dict[bytes, str] = {}

    def plain_headers(self, buf: bytearray, start: int, stop: int) -> bool:
        """Headers the receiver ignores (a message id, say): no status line (which
        marks heartbeats, flow control and errors) and no ``marker`` header."""
        if not buf.startswith(PLAIN_STATUS, start):
            return False
        return self.marker is None or buf.find(self.marker, start, stop) < 0

    def kept(self, buf: bytearray, start: int, stop: int) -> bytes | None:
        """The header block ``buf[start:stop]`` if the receiver wants it (it carries
        trace context and is not oversized), else ``None``."""
        if stop - start > MAX_KEPT or buf.find(KEPT_HEADER, start, stop) < 0:
            return None
        return bytes(buf[start:stop])

    def done(self) -> None:
        """The callback handled one message that took the client's path."""
        if self.busy > 0:
            self.busy -= 1


def header_values(block: bytes, names: tuple[str, ...]) -> dict[str, str] | None:
    """``{name: value}`` of the ``names`` found in a NATS header block
    (``NATS/1.0\\r\\nName: value\\r\\n...``), the first of each; ``None`` if none.

    The block comes from a peer: at most :data:`MAX_KEPT` bytes are read, lines
    that are not ``Name: value`` are skipped, values are decoded leniently.
    """
    out: dict[str, str] = {}
    for line in block[:MAX_KEPT].split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        key = name.strip().decode("ascii", "replace")
        if key in names and key not in out:
            out[key] = value.strip().decode("ascii", "replace")
    return out or None
