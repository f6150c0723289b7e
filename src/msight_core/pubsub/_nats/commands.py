"""Protocol commands the NATS backend's publisher sends (not public API, no I/O).

A plain publish is ``PUB <subject> <size>\\r\\n<payload>\\r\\n``; the publisher
formats it on the caller's thread. A message that waits for a JetStream
acknowledgement, :class:`Tracked`, is an ``HPUB`` with a ``Nats-Msg-Id`` header,
so that the stream drops a resent copy, and a reply subject under a private
inbox that names it (``<ack prefix><id>``), where the stream's ack arrives. A
payload above ``max_payload``, :class:`Frame`, becomes tracked chunks on the
large-frame stream followed by a notice on the topic (:mod:`.frames`), cut by
:meth:`Commands.frame`.
"""

from __future__ import annotations

import itertools
import re
import uuid
from typing import Any

from .frames import LARGE_SUBJECT_PREFIX, chunk_header, notice_headers

__all__ = ["CRLF", "Commands", "Frame", "Tracked", "header_lines", "hpub_head"]

CRLF = b"\r\n"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_VALUE = re.compile(r"[\x20-\x7e]{0,512}")


def header_lines(headers: dict[str, str] | None) -> bytes:
    """``Name: value\\r\\n`` lines of ``headers`` (trace context) for an ``HPUB``.

    Pairs that would break the header block (a name that is not a token, a
    value with a control character or longer than 512) are left out.
    """
    if not headers:
        return b""
    return b"".join(
        f"{k}: {v}\r\n".encode()
        for k, v in headers.items()
        if isinstance(k, str) and isinstance(v, str) and _NAME.fullmatch(k) and _VALUE.fullmatch(v)
    )


def hpub_head(name: str, size: int, lines: bytes) -> bytes:
    """The head of a core ``HPUB`` of ``size`` payload bytes with the header ``lines``,
    header block included: the payload and a CRLF follow it."""
    hdr = b"NATS/1.0\r\n" + lines + CRLF
    return b"HPUB %s %d %d\r\n%s" % (name.encode(), len(hdr), len(hdr) + size, hdr)


class Tracked:
    """A command that waits for a JetStream acknowledgement."""

    __slots__ = ("first_sent", "id", "pieces", "sent_at", "size", "what")

    def __init__(self, ident: int, pieces: list[bytes], size: int, what: str) -> None:
        self.id = ident
        self.pieces = pieces
        self.size = size
        self.sent_at = 0.0
        self.first_sent = 0.0  # when first handed over: the retry budget starts there
        self.what = what


class Frame:
    """A payload above ``max_payload``: chunked into JetStream by the writer."""

    __slots__ = ("data", "lines", "name", "size")

    def __init__(self, name: str, data: bytes, lines: bytes = b"") -> None:
        self.name = name
        self.data = data
        self.size = len(data)
        self.lines = lines


class Commands:
    """Tracked commands of one publisher: their ids, ack inbox and message ids."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        token = uuid.uuid4().hex[:16]
        self.ack_prefix = f"_INBOX.msight{token}."
        self._ack_prefix_b = self.ack_prefix.encode()
        self._msgid_prefix = token.encode()

    def ack_id(self, subject: str) -> int | None:
        """The id of the tracked command an ack on ``subject`` is for."""
        try:
            return int(subject[len(self.ack_prefix) :])
        except ValueError:
            return None

    def _hpub(self, subject: bytes, ident: int, hdr: bytes, size: int) -> bytes:
        return b"HPUB %s %s%d %d %d\r\n" % (
            subject,
            self._ack_prefix_b,
            ident,
            len(hdr),
            len(hdr) + size,
        )

    def tracked(self, name: str, data: bytes, size: int, lines: bytes = b"") -> Tracked:
        """``data`` for ``name``, stored once by the stream however often it is sent
        (``lines``: more header lines, from :func:`header_lines`)."""
        ident = next(self._ids)
        hdr = b"NATS/1.0\r\nNats-Msg-Id: %s.%d\r\n%s\r\n" % (self._msgid_prefix, ident, lines)
        head = self._hpub(name.encode(), ident, hdr, size)
        return Tracked(ident, [head, hdr, data, CRLF], len(hdr) + size, name)

    def frame(self, frame: Frame, stream: str, chunk: int, tracked_notice: bool) -> list[Any]:
        """The chunks of ``frame`` (on ``stream``, ``chunk`` bytes each), then its notice.

        The notice is tracked too in JetStream mode (``tracked_notice``); in core
        mode it is a plain ``HPUB`` (``bytes``). It carries the frame's header
        lines (trace context), if any.
        """
        frame_id = f"{self._msgid_prefix.decode()}{next(self._ids)}"
        subject = (LARGE_SUBJECT_PREFIX + frame_id).encode()
        view = memoryview(frame.data)
        pieces: list[Any] = []
        count = 0
        for offset in range(0, frame.size, chunk):
            part = bytes(view[offset : offset + chunk])
            ident = next(self._ids)
            hdr = chunk_header(subject, count)
            head = self._hpub(subject, ident, hdr, len(part))
            pieces.append(Tracked(ident, [head, hdr, part, CRLF], len(hdr) + len(part), frame.name))
            count += 1
        notice = notice_headers(frame_id, frame.size, count, stream) + frame.lines
        name = frame.name.encode()
        if tracked_notice:
            ident = next(self._ids)
            hdr = notice + b"Nats-Msg-Id: %s.%d\r\n\r\n" % (self._msgid_prefix, ident)
            pieces.append(
                Tracked(ident, [self._hpub(name, ident, hdr, 0), hdr, CRLF], len(hdr), frame.name)
            )
        else:
            hdr = notice + CRLF
            pieces.append(b"HPUB %s %d %d\r\n%s\r\n" % (name, len(hdr), len(hdr), hdr))
        return pieces
