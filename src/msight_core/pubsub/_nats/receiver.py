"""The direct socket read of the NATS backend's parser (not public API).

:class:`Receiver` is an ``asyncio.BufferedProtocol`` that the parser installs
on a connection in place of nats-py's ``StreamReaderProtocol`` (through
:mod:`.internals`): the socket is read straight into the parser's buffer, or
into its frame buffer while a large payload is being read, as much as the
kernel has per read. It uses only public asyncio API; it knows the parser's
buffer attributes (``buf``, ``end``, ``frame``, ``frame_head``,
``frame_fill``) and nothing else.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

__all__ = ["AFTER_FRAME_READ", "Buffers", "Receiver"]

AFTER_FRAME_READ = 64 * 1024  # the read after a large payload, at most


class Buffers(Protocol):
    """The parser's buffers, as the receiver fills them."""

    buf: bytearray
    """Received bytes; ``len(buf)`` is its capacity."""
    end: int
    """Bytes received in ``buf`` up to here."""
    frame: bytearray
    """The buffer a large payload is read into."""
    frame_head: tuple[bytes, int, bytes, int, int] | None
    """The large message being read (its size is ``frame_head[4]``), if any."""
    frame_fill: int
    """Bytes of it (and its CRLF) in ``frame``."""


class Receiver(asyncio.BufferedProtocol):
    """Reads a connection's socket straight into a :class:`FastParser`'s buffer.

    Installed in place of the connection's ``StreamReaderProtocol`` (``old``),
    which still hears about end of file, loss of the connection and write flow
    control, so nats-py's reader and writer see those as before.
    """

    def __init__(self, parser: Buffers, transport: Any, old: Any) -> None:
        self._parser = parser
        self.transport = transport
        self._old = old
        self.closed = False
        self.paused = False
        self.detached = False  # the parser was reset: what still arrives is discarded
        self._waiter: asyncio.Future[None] | None = None
        self.after_frame = False  # the next read into the ring buffer is a short one

    # -- asyncio.BufferedProtocol ----------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.detached:
            return memoryview(bytearray(64 * 1024))
        parser = self._parser
        head = parser.frame_head
        if head is not None and parser.frame_fill < head[4] + 2:
            # The rest of a large payload and its CRLF. (Once it is complete, what
            # follows goes to the ring buffer, empty meanwhile: the order holds.)
            return memoryview(parser.frame)[parser.frame_fill : head[4] + 2]
        buf = parser.buf
        if parser.end >= len(buf):  # not expected (full pauses reading): never return nothing
            buf.extend(bytes(64 * 1024))
        stop = len(buf)
        if self.after_frame:
            # Large payloads tend to follow one another (a frame's chunks): read the
            # next one's MSG line and a little of it, so that the rest is read into
            # the frame buffer, not into the ring buffer to be copied from there
            # (and a ring buffer filled to the brim pauses reading: two syscalls).
            self.after_frame = False
            stop = min(stop, parser.end + AFTER_FRAME_READ)
        return memoryview(buf)[parser.end : stop]

    def buffer_updated(self, nbytes: int) -> None:
        if self.detached:
            return
        parser = self._parser
        head = parser.frame_head
        if head is not None and parser.frame_fill < head[4] + 2:
            parser.frame_fill += nbytes
            if parser.frame_fill >= head[4] + 2:
                self.after_frame = True
                self._wake()
            return
        parser.end += nbytes
        if parser.end >= len(parser.buf):  # full: the pump makes room, then resumes
            self.pause()
        self._wake()

    def eof_received(self) -> bool | None:
        self.closed = True
        self._wake()
        return self._old.eof_received()  # type: ignore[no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        self._old.connection_lost(exc)

    def pause_writing(self) -> None:
        self._old.pause_writing()

    def resume_writing(self) -> None:
        self._old.resume_writing()

    # -- the parser's side ------------------------------------------------------------

    def detach(self) -> None:
        """The parser was reset (nats-py is reconnecting): bytes still read from this
        connection must not reach the parser's buffers, now the next connection's."""
        self.detached = True
        self.closed = True
        self._wake()

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until more bytes arrived or the connection ended."""
        if self.closed:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
