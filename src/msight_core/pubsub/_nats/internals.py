"""Every use of nats-py's private API by the NATS backend (not public API).

The backend reaches past nats-py's public API where that buys most of its
speed, and only in this module. Each access is checked against the installed
nats-py (the attribute is there, the signature is the one we call) once per
client class; when a check fails, or when :data:`FORCE_PUBLIC` is set, the
public path is taken instead. Which path each feature takes is logged once at
DEBUG on ``msight_core.pubsub.nats``.

================  ==========================================  ==========================
feature           private API                                 public fallback
================  ==========================================  ==========================
parser            ``Client._ps`` (the stock ``Parser``),      nats-py's parser, ``Msg``
                  ``Client._process_msg/_err/_ping/_pong/``   objects and callbacks
                  ``_info``, ``Subscription._id``
direct read       ``Client._transport`` (``_io_reader`` and   nats-py's reads through
                  its ``_buffer``, ``_io_writer.transport``)  its ``StreamReader``
JetStream routes  ``PushSubscription._sub``, ``._jsi._ccreq``  nats-py's callbacks
send buffer       ``Client._send_command``, ``_flush_pending``  ``Client.publish`` and
                                                              ``Client.flush``
round trip        ``Client._flush_pending`` before the PING   two ``Client.flush``
direct write      ``Client._transport`` (``_io_writer``),     the send buffer
                  ``_pending``, ``_pending_data_size``
server info       ``Client._server_info["jetstream"]``        a JetStream account-info
                                                              request
reconnect limit   ``Client.options["max_reconnect_attempts"]``  reconnect forever from
                                                              the start; the caller
                                                              bounds the first connect
================  ==========================================  ==========================
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

try:
    from nats.protocol.parser import Parser as _StockParser
except ImportError:  # pragma: no cover - a nats-py without that module: no fast parser
    _StockParser = None  # type: ignore[assignment,misc]

__all__ = [
    "FORCE_PUBLIC",
    "ClientHooks",
    "Wire",
    "can_lift_reconnect_limit",
    "client_hooks",
    "confirm",
    "core_route",
    "install_parser",
    "jetstream_route",
    "lift_reconnect_limit",
    "server_jetstream",
]

logger = logging.getLogger("msight_core.pubsub.nats")

#: Take the public path everywhere. Read whenever a client is set up, so a test
#: sets it before creating the backend.
FORCE_PUBLIC = False

_P = TypeVar("_P")
_announced: dict[str, bool] = {}
_checked: dict[tuple[type, str], bool] = {}


def _path(feature: str, private: bool) -> bool:
    """Log at DEBUG, once per path, which path ``feature`` takes; return ``private``."""
    if _announced.get(feature) is not private:
        _announced[feature] = private
        logger.debug(
            "NATS %s: %s", feature, "nats-py internals" if private else "public nats-py API"
        )
    return private


def _check(nc: Any, feature: str, test: Callable[[Any], bool]) -> bool:
    """``test(nc)``, computed once per client class; an exception counts as False."""
    key = (type(nc), feature)
    ok = _checked.get(key)
    if ok is None:
        try:
            ok = bool(test(nc))
        except (AttributeError, TypeError, ValueError):
            ok = False
        _checked[key] = ok
    return ok


def _params(func: Any) -> list[str]:
    return list(inspect.signature(func).parameters)


# -- the parser --------------------------------------------------------------------


class ClientHooks:
    """nats-py's handlers for what the fast parser does not route, bound once."""

    __slots__ = (
        "process_err",
        "process_info",
        "process_msg",
        "process_ping",
        "process_pong",
        "stats",
    )

    def __init__(self, nc: Any) -> None:
        self.process_msg = nc._process_msg
        self.process_err = nc._process_err
        self.process_ping = nc._process_ping
        self.process_pong = nc._process_pong
        self.process_info = nc._process_info
        self.stats: dict[str, int] = nc.stats


def _hooks_compatible(nc: Any) -> bool:
    hooks = all(
        callable(getattr(nc, name, None))
        for name in ("_process_err", "_process_ping", "_process_pong", "_process_info")
    )
    signature = _params(nc._process_msg)[:5] == ["sid", "subject", "reply", "data", "headers"]
    return hooks and signature and isinstance(nc.stats, dict)


def client_hooks(nc: Any) -> ClientHooks | None:
    """The client's message and control-line handlers; ``None`` if they differ
    from what the parser calls."""
    return ClientHooks(nc) if _check(nc, "hooks", _hooks_compatible) else None


def install_parser(nc: Any, make: Callable[[ClientHooks], _P]) -> _P | None:
    """Give a not yet connected client the parser ``make(hooks)``.

    Returns:
        The parser, or ``None`` if nats-py's own stays (the client's parser is
        not nats-py's stock one, the hooks differ, or :data:`FORCE_PUBLIC`).
    """
    stock = _StockParser is not None and type(getattr(nc, "_ps", None)) is _StockParser
    hooks = client_hooks(nc) if stock and not FORCE_PUBLIC else None
    if not _path("parser", hooks is not None):
        return None
    assert hooks is not None
    parser = make(hooks)
    nc._ps = parser
    if _path("direct read", hasattr(parser, "adopt")):
        parser.take_over = lambda p: _take_over_reading(nc, p)  # type: ignore[attr-defined]
    return parser


def _take_over_reading(nc: Any, parser: Any) -> Any:
    """Have ``parser`` read the client's current connection itself.

    The connection's ``StreamReaderProtocol`` is replaced by the parser's
    receiver (which passes end of file, loss and write flow control on to it);
    what its ``StreamReader`` had buffered goes to the parser first. Returns
    the receiver, or ``None`` (the connection is not nats-py's TCP transport as
    expected, or is closing): reads then go on through nats-py.
    """
    try:
        tcp = nc._transport
        if type(tcp).__name__ != "TcpTransport":
            return None
        reader = tcp._io_reader
        transport = tcp._io_writer.transport
        old = transport.get_protocol()
        buffered = reader._buffer
        ok = (
            isinstance(reader, asyncio.StreamReader)
            and isinstance(old, asyncio.StreamReaderProtocol)
            and isinstance(buffered, bytearray)
            and callable(getattr(transport, "set_protocol", None))
            and not transport.is_closing()
        )
    except AttributeError:
        ok = False
    if not ok:
        _path("direct read", False)
        return None
    receiver = parser.adopt(transport, old, bytes(buffered))
    buffered.clear()
    transport.set_protocol(receiver)
    if not transport.is_reading():  # the StreamReader paused it (64 KB buffered)
        transport.resume_reading()
    return receiver


def core_route(sub: Any) -> tuple[int, int] | None:
    """``(sid, delivered so far)`` of a core subscription, for a direct route;
    ``None`` leaves it on nats-py's path."""
    sid = getattr(sub, "_id", None)
    if not _path("subscription ids", not FORCE_PUBLIC and type(sid) is int):
        return None
    return sid, int(sub.delivered)


def jetstream_route(sub: Any) -> tuple[int, int] | None:
    """As :func:`core_route`, for a JetStream push subscription.

    Only if its consumer uses neither idle heartbeats nor flow control (ours
    never do; one made elsewhere may), which nats-py tracks on its own path.
    """
    inner = getattr(sub, "_sub", None)
    consumer = getattr(getattr(inner, "_jsi", None), "_ccreq", None)
    if not _path("JetStream consumer config", not FORCE_PUBLIC and consumer is not None):
        return None
    if getattr(consumer, "idle_heartbeat", True) or getattr(consumer, "flow_control", True):
        return None
    return core_route(inner)


# -- connection facts --------------------------------------------------------------


def server_jetstream(nc: Any) -> bool | None:
    """Whether the server's INFO announced JetStream; ``None``: ask the server."""
    info = getattr(nc, "_server_info", None)
    if not _path("server info", not FORCE_PUBLIC and isinstance(info, dict)):
        return None
    return bool(info.get("jetstream"))  # type: ignore[union-attr]


def can_lift_reconnect_limit(nc: Any) -> bool:
    """Whether :func:`lift_reconnect_limit` will work on this not yet connected client.

    If not, connect with ``max_reconnect_attempts=-1`` and bound the first
    connect yourself.
    """
    return _path(
        "reconnect limit", not FORCE_PUBLIC and isinstance(getattr(nc, "options", None), dict)
    )


def lift_reconnect_limit(nc: Any) -> None:
    """After the first connect (each server tried once): reconnect forever."""
    options = nc.options
    if "max_reconnect_attempts" not in options:  # pragma: no cover - a different nats-py
        logger.debug("nats-py has no max_reconnect_attempts option; reconnects stay limited")
        return
    options["max_reconnect_attempts"] = -1


# -- sending -----------------------------------------------------------------------


def _send_buffer_ok(nc: Any) -> bool:
    return (
        _params(nc._send_command)[:1] == ["cmd"]
        and "force_flush" in _params(nc._flush_pending)
        and isinstance(nc.pending_data_size, int)
    )


def _direct_ok(nc: Any) -> bool:
    return (
        isinstance(nc._pending, list)
        and isinstance(nc._pending_data_size, int)
        and hasattr(nc._transport, "write")
    )


async def confirm(nc: Any, timeout: float) -> None:
    """A round trip after which the server has processed every command queued before.

    nats-py's ``flush()`` writes its PING straight to the transport, ahead of
    commands still waiting in its send buffer for the flusher task (a SUB just
    made, PUBs), so its PONG can come back before the server saw them: a
    subscription "confirmed" that way missed messages published right after,
    and a permission refusal arrived after the PONG. The buffer is written out
    first; on the public path a second round trip follows the first (the
    flusher wrote the buffer while the first PING was out).

    Raises:
        whatever ``Client.flush`` raises (timeout, closed connection).
    """
    if not FORCE_PUBLIC and _check(nc, "send buffer", _send_buffer_ok):
        if _path("round trip", True) and nc.is_connected:
            await nc._flush_pending(force_flush=True)
        await nc.flush(timeout)
        return
    _path("round trip", False)
    await nc.flush(timeout)
    await nc.flush(timeout)


class Wire:
    """How the writer hands protocol commands to one connected nats-py client.

    Commands are whole ``PUB``/``HPUB`` commands with their payloads, as the
    publisher formats them. On the private path they are appended to nats-py's
    send buffer, written out by its flusher task; a large message on a TCP
    connection goes straight to the asyncio transport, which sends what the
    socket takes and copies only the rest (nats-py's path would copy a 16 MB
    frame three times more). On the public path each command is passed to
    ``Client.publish``.
    """

    def __init__(self, nc: Any, timeout: float) -> None:
        self._nc = nc
        self._timeout = timeout
        private = not FORCE_PUBLIC and _check(nc, "send buffer", _send_buffer_ok)
        self.buffered = _path("send buffer", private)
        self.direct = _path("direct write", private and _check(nc, "direct write", _direct_ok))
        self._refused: Any = None  # the transport a direct write failed on
        self.unconfirmed = 0
        """Large-payload bytes written since the last :meth:`round_trip`."""
        self.pong: Any = None
        """The pacing round trip in flight (a task), if any."""

    @property
    def pending_bytes(self) -> int:
        """Bytes in nats-py's send buffer, not yet written to the socket."""
        return int(self._nc.pending_data_size)

    async def write(self, commands: bytes) -> None:
        """Append ``commands`` to what goes out, in order."""
        if self.buffered:
            await self._nc._send_command(commands)
        else:
            await _publish_commands(self._nc, commands)

    async def write_message(self, pieces: tuple[bytes, ...]) -> None:
        """One command in pieces (a large message): nothing comes between them.

        Nothing suspends between the pieces. After a direct write this waits
        until the transport's buffer has drained.
        """
        nc = self._nc
        if self.direct:
            transport = nc._transport
            if type(transport).__name__ == "TcpTransport" and transport is not self._refused:
                try:
                    _write_through(nc, transport, pieces)
                except Exception as exc:  # noqa: BLE001 - the connection is going down
                    logger.debug("direct NATS write refused: %s", type(exc).__name__)
                    self._refused = transport  # this and the rest wait in nats-py's buffer
                else:
                    try:
                        await transport.drain()
                    except Exception as exc:  # noqa: BLE001 - lost with the connection
                        # Counted as at risk by the disconnect (Publisher.lost_connection).
                        logger.debug("NATS connection lost while writing: %s", type(exc).__name__)
                        self._refused = transport
                    return
        if self.buffered:
            for part in pieces:
                # No suspension: the client's pending_size is never reached.
                await nc._send_command(part)
        else:
            await _publish_commands(nc, b"".join(pieces))

    async def round_trip(self) -> None:
        """A PING and its PONG: the server has processed everything written before."""
        self.unconfirmed = 0
        try:
            await confirm(self._nc, max(self._timeout, 1.0))
        except Exception as exc:  # noqa: BLE001 - a disconnect is reported elsewhere
            logger.debug("pacing round trip failed: %s", type(exc).__name__)

    async def flush(self, force: bool) -> None:
        """Have nats-py write its buffer out; ``force`` waits until it has."""
        if self.buffered:
            await self._nc._flush_pending(force_flush=force)
        elif force:
            await self._nc.flush(max(self._timeout, 1.0))


def _write_through(nc: Any, transport: Any, pieces: tuple[bytes, ...]) -> None:
    writer = getattr(transport, "_io_writer", None)
    if writer is None or writer.is_closing():
        raise ConnectionResetError("the NATS connection is closing")  # nothing written
    if nc._pending:  # what was queued before goes first
        transport.writelines(nc._pending)
        nc._pending = []
        nc._pending_data_size = 0
    for part in pieces:
        transport.write(memoryview(part))  # sliced, not copied, by a partial send


async def _publish_commands(nc: Any, commands: bytes) -> None:
    """The public path: each ``PUB``/``HPUB`` command through ``Client.publish``."""
    pos = 0
    end = len(commands)
    while pos < end:
        eol = commands.index(b"\r\n", pos)
        op, subject, *rest = commands[pos:eol].split()
        if op == b"HPUB":
            *reply, hdr_text, total_text = rest
            hdr_size = int(hdr_text)
        elif op == b"PUB":
            *reply, total_text = rest
            hdr_size = 0
        else:  # pragma: no cover - the publisher formats only PUB and HPUB
            raise ValueError(f"not a publish command: {op!r}")
        start = eol + 2
        body = start + hdr_size
        stop = start + int(total_text)
        headers = _headers(commands[start:body]) if hdr_size else None
        await nc.publish(
            subject.decode(),
            commands[body:stop],
            reply=reply[0].decode() if reply else "",
            headers=headers,
        )
        pos = stop + 2


def _headers(block: bytes) -> dict[str, str] | None:
    """``NATS/1.0\\r\\nName: value\\r\\n...\\r\\n`` -> ``{name: value}``."""
    out: dict[str, str] = {}
    for line in block.decode().split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip()] = value.strip()
    return out or None
