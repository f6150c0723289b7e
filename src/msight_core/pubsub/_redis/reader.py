"""Replies read off a subscribing socket in bulk: hiredis for small ones, big frames direct.

hiredis parses small replies fast, but a large payload costs it two copies and
repeated buffer growth: about 0.5 ms per MB of reader CPU, three times a bare
``recv_into``. A subscriber that falls behind a flat-out publisher by 32 MB is
disconnected by the server (its pub/sub output limit), so large frames bypass
hiredis: once a ``message``/``smessage``/``pmessage`` push whose payload is at least
``_DIRECT_MIN`` bytes is found at a known reply boundary, the rest of the frame
is received straight into a buffer of its size (one kernel copy) and handed out
as ``bytes`` (one more copy).

Boundaries are exact, never guessed from payload bytes: a boundary is known where
hiredis holds no partial reply; from there, when a slice of input completes no
reply, the replies up to the partial one are skipped by :func:`skip_reply`
(a strict RESP2 walker) to find where it starts. Every length read from the
stream is checked against the bytes present and against ``_MAX_BULK`` before
anything is allocated; anything unexpected stays with hiredis.
"""

from __future__ import annotations

import socket
from typing import Any

from ...errors import MissingDependencyError

try:
    import hiredis
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingDependencyError("hiredis", "redis") from exc

__all__ = ["ReplyStream", "skip_reply"]

_RECV_CHUNK = 1024 * 1024
_FEED_SLICE = 16 * 1024
#: Payloads from this size are received straight into a buffer of their own.
_DIRECT_MIN = 128 * 1024
#: Redis's own ceiling for one bulk string (``proto-max-bulk-len``, 512 MB).
_MAX_BULK = 512 * 1024 * 1024
_PUSH_KINDS = {b"message": 3, b"smessage": 3, b"pmessage": 4}  # kind -> elements
_MAX_DIGITS = 10
_KEEP_FRAME_BUF = 64 * 1024 * 1024  # frame buffer kept between frames, at most
_MAX_LINE = 4096  # a longer status or error line is left to hiredis
_CRLF = b"\r\n"


def _line_end(buf: bytearray, start: int, n: int, longest: int = _MAX_DIGITS + 3) -> int:
    """Index of the CRLF ending the line at ``start`` within ``longest`` bytes; else -1."""
    return buf.find(_CRLF, start, min(n, start + longest))


def _number(buf: bytearray, start: int, end: int) -> int:
    """The integer in ``buf[start:end]``; -1 for anything but 1-10 ASCII digits."""
    if not 0 < end - start <= _MAX_DIGITS:
        return -1
    text = buf[start:end]
    return int(text) if text.isdigit() else -1


def skip_reply(buf: bytearray, pos: int, n: int, depth: int = 0) -> int:
    """Where the RESP2 reply starting at ``pos`` ends; -1 if incomplete or not RESP2.

    Only ``buf[pos:n]`` is read; nothing is allocated beyond small header slices.
    """
    if pos >= n or depth > 2:
        return -1
    kind = buf[pos]
    if kind in (0x2B, 0x2D, 0x3A):  # + - :  one line
        end = _line_end(buf, pos + 1, n, _MAX_LINE)
        return end + 2 if end >= 0 else -1
    end = _line_end(buf, pos + 1, n)
    if end < 0:
        return -1
    count = _number(buf, pos + 1, end)
    if kind == 0x24:  # $ bulk string
        if count < 0 or count > _MAX_BULK:
            return -1
        stop = end + 2 + count + 2
        return stop if stop <= n else -1
    if kind == 0x2A:  # * array (pub/sub replies nest no deeper than 2)
        if count < 0 or count > 16:
            return -1
        pos = end + 2
        for _ in range(count):
            pos = skip_reply(buf, pos, n, depth + 1)
            if pos < 0:
                return -1
        return pos
    return -1


class ReplyStream:
    """Replies read off one subscribing socket; see the module docstring."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = hiredis.Reader()
        self._buf = bytearray(_RECV_CHUNK)
        self._view = memoryview(self._buf)
        # A large payload being received directly: [kind, (pattern,) channel, buffer].
        self._frame: list[Any] | None = None
        self._frame_buf = bytearray()
        self._filled = 0
        self.direct_frames = 0

    def read(self) -> list[Any]:
        """One receive (blocking); every reply it completed, possibly none.

        Raises:
            ConnectionResetError: the server closed the connection.
            OSError, hiredis.ProtocolError: the connection or the stream broke.
        """
        if self._frame is not None:
            return self._continue_frame()
        n = self.sock.recv_into(self._view)
        if not n:
            raise ConnectionResetError("connection closed by Redis")
        return self._feed(n)

    def _feed(self, n: int) -> list[Any]:
        buf, view, reader = self._buf, self._view, self.reader
        replies: list[Any] = []
        # Where a reply is known to start in this chunk (None: inside one from before).
        boundary: int | None = None if reader.has_data() else 0
        offset = 0
        while offset < n:
            step = min(_FEED_SLICE, n - offset)
            reader.feed(view, offset, step)
            offset += step
            before = len(replies)
            while (reply := reader.gets()) is not False:
                replies.append(reply)
            if not reader.has_data():
                boundary = offset
            elif boundary is not None and len(replies) == before:
                # A whole slice and no reply: a large one is under way. Find it.
                start = boundary
                while start >= 0 and start < offset:
                    stop = skip_reply(buf, start, offset)
                    if stop < 0:
                        break
                    start = stop
                boundary = None
                taken = self._take_frame(start, n, replies) if 0 <= start < offset else -1
                if taken >= 0:
                    # hiredis held only the start of this frame: drop it with the reader.
                    self.reader = reader = hiredis.Reader()
                    if self._frame is not None:
                        return replies  # the rest arrives straight into the frame
                    offset = boundary = taken
        return replies

    def _take_frame(self, start: int, n: int, replies: list[Any]) -> int:
        """Take over the push message at ``start`` if its payload is large.

        Returns -1 if not taken; else where the frame ends in this chunk (its reply
        appended to ``replies``), or ``n`` when the rest is still to come.
        """
        buf = self._buf
        # *3\r\n $<k>\r\n<kind>\r\n [$<g>\r\n<pattern>\r\n] $<c>\r\n<channel>\r\n $<p>\r\n<payload>
        head = buf[start : start + 4]
        if head == b"*3\r\n":
            count = 2
        elif head == b"*4\r\n":
            count = 3
        else:
            return -1
        pos = start + 4
        fields: list[bytes] = []
        for _ in range(count):
            end = _line_end(buf, pos, n)
            if end < 0 or buf[pos] != 0x24:
                return -1
            size = _number(buf, pos + 1, end)
            if size < 0 or end + 2 + size + 2 > n:
                return -1
            fields.append(bytes(buf[end + 2 : end + 2 + size]))
            if buf[end + 2 + size : end + 4 + size] != _CRLF:
                return -1
            pos = end + 4 + size
        end = _line_end(buf, pos, n)
        if _PUSH_KINDS.get(fields[0]) != count + 1 or end < 0 or buf[pos] != 0x24:
            return -1
        size = _number(buf, pos + 1, end)
        if size < _DIRECT_MIN or size > _MAX_BULK:
            return -1
        if len(self._frame_buf) < size + 2:  # reused: no page faults per frame
            self._frame_buf = bytearray(size + 2)
        frame = memoryview(self._frame_buf)[: size + 2]  # payload and its CRLF
        have = min(n - (end + 2), size + 2)
        frame[:have] = self._view[end + 2 : end + 2 + have]
        self._frame = [*fields, frame]
        self._filled = have
        if have < size + 2:
            return n
        replies.append(self._finish_frame())
        return end + 2 + have

    def _continue_frame(self) -> list[Any]:
        assert self._frame is not None
        frame = self._frame[-1]
        got = self.sock.recv_into(frame[self._filled :])
        if not got:
            raise ConnectionResetError("connection closed by Redis")
        self._filled += got
        if self._filled < len(frame):
            return []
        return [self._finish_frame()]

    def _finish_frame(self) -> list[Any]:
        assert self._frame is not None
        *fields, frame = self._frame
        self._frame = None
        if frame[-2:] != _CRLF:
            raise hiredis.ProtocolError("large frame not followed by CRLF")
        self.direct_frames += 1
        payload = bytes(frame[:-2])
        frame.release()
        if len(self._frame_buf) > _KEEP_FRAME_BUF:  # a rare huge frame: do not keep it
            self._frame_buf = bytearray()
        return [*fields, payload]
