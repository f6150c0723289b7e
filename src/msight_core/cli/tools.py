"""``msight broker``, ``msight pub`` and ``msight sub``.

What ``msight sub`` prints comes from whoever could publish on the topic: every
received string goes through :func:`escape_control` before it reaches the
terminal, so a payload cannot send escape sequences (retitle the window, clear
the screen, move the cursor). ``--raw`` is the exception: it writes the bytes
unchanged, for pipes and files.
"""

from __future__ import annotations

import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from ..errors import DeserializationError
from ..pubsub import get_pubsub
from ..topics import topic_name
from .common import CliError, Target, fmt_bytes, start_embedded

__all__ = ["describe_payload", "escape_control", "run_broker", "run_pub", "run_sub"]

_FIELD_LIMIT = 120  # characters of one received name shown in a summary line


def escape_control(text: str, limit: int | None = None) -> str:
    """``text`` made safe for a terminal: non-printable characters become escapes.

    Control characters (C0 such as ESC and BEL, DEL, C1 such as CSI), line
    separators, bidi overrides and other format characters are written as
    ``\\x1b``, ``\\u202e`` ...; everything printable is kept as it is.

    Args:
        text: received content.
        limit: cut to this many characters (plus ``...``) first; ``None`` keeps all.
    """
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_broker(kind: str, port: int | None, out: TextIO, err: TextIO) -> int:
    """Run an embedded broker in the foreground until Ctrl-C (or SIGTERM).

    Prints the ``export MSIGHT_...`` lines to ``out`` and status to ``err``.

    Raises:
        MissingDependencyError: the ``brokers`` extra is missing.
        BrokerUnavailableError: the server did not start (port taken, ...).
        CliError: the server exited on its own.
    """
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    broker = None
    try:
        broker = start_embedded(kind, port)
        out.writelines(
            f"export {var}={shlex.quote(value)}\n" for var, value in broker.env().items()
        )
        out.flush()
        extra = ""
        if kind == "nats":
            extra = f", JetStream on, max_payload {fmt_bytes(broker.max_payload)}"
        err.write(
            f"{kind} broker running on {broker.address}{extra} (log: {broker.log_path}); "
            "paste the lines above into another shell. Ctrl-C to stop.\n"
        )
        err.flush()
        while broker.running:
            time.sleep(0.2)
        raise CliError(f"the {kind} broker exited on its own: {broker.log_tail()}")
    except KeyboardInterrupt:
        err.write(f"stopping the {kind} broker\n")
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if broker is not None:
            broker.close()


def run_pub(target: Target, topic: str, source: BinaryIO, whole: bool, err: TextIO) -> int:
    """Publish ``source`` to ``topic``: one message per line, or all of it as one.

    Raises:
        InvalidTopicError: the topic name is not portable.
        MsightError: the backend failed (unreachable, payload too large ...).
    """
    name = topic_name(topic)
    count = size = 0
    env = dict(target.env)
    # Lines are a sequence: on Kafka keep them in one partition, in order, unless
    # the user chose otherwise (MSIGHT_KAFKA_ORDERED).
    env.setdefault("MSIGHT_KAFKA_ORDERED", "true")
    with get_pubsub(env=env) as backend:
        if whole:
            data = source.read()
            backend.publish(name, data)
            count, size = 1, len(data)
        else:
            for line in source:
                data = line.rstrip(b"\r\n")
                backend.publish(name, data)
                count += 1
                size += len(data)
        backend.flush()
    err.write(f"published {count} message(s), {fmt_bytes(size)}, to {name} on {target.backend}\n")
    return 0


def run_sub(
    target: Target,
    topic: str,
    count: int | None,
    group: str | None,
    timeout: float | None,
    out_dir: str | None,
    raw: bool,
    out: TextIO,
    err: TextIO,
) -> int:
    """Print (or save) what arrives on ``topic`` until ``count`` or ``timeout``.

    Exit code 0, or :class:`CliError` when ``count`` messages did not arrive in time.

    Raises:
        CliError: timed out before ``count`` messages.
        MsightError: the backend failed.
    """
    name = topic_name(topic)
    if count is not None and count < 1:
        raise CliError("--count must be at least 1", code=2)
    if timeout is not None and timeout <= 0:
        raise CliError("--timeout must be positive", code=2)
    directory = Path(out_dir) if out_dir else None
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    received = 0
    backend = get_pubsub(group_id=group, env=target.env)
    try:
        backend.subscribe(name)
        joined = f" in group {group}" if group else ""
        err.write(f"subscribed to {name}{joined} on {target.backend}; Ctrl-C to stop\n")
        err.flush()
        deadline = None if timeout is None else time.monotonic() + timeout
        while count is None or received < count:
            wait = 0.5
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    break
            message = backend.receive(wait)  # type: ignore[attr-defined]
            if message is None:
                continue
            received += 1
            if directory is not None:
                path = directory / f"{message.topic}.{received:06d}.bin"
                path.write_bytes(message.data)
                out.write(f"{escape_control(str(path))}\n")
            elif raw:
                out.flush()
                sys.stdout.buffer.write(message.data + b"\n")
                sys.stdout.buffer.flush()
                continue
            else:
                out.write(describe_payload(message.data) + "\n")
            out.flush()
    except KeyboardInterrupt:
        err.write(f"interrupted after {received} message(s)\n")
        return 0
    finally:
        backend.close()
    if count is not None and received < count:
        raise CliError(f"timed out after {timeout:g}s with {received} of {count} message(s)")
    return 0


def describe_payload(data: bytes) -> str:
    """One printable line for a payload: an msight Data summary, text, or a hex preview.

    Nothing received reaches the line unescaped (see :func:`escape_control`).
    """
    summary = _describe_data(data)
    if summary is not None:
        return summary
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.isprintable():
        return escape_control(text)  # printable already: kept whole and unchanged
    preview = data[:24].hex(" ")
    more = " ..." if len(data) > 24 else ""
    return f"<{len(data)} bytes: {preview}{more}>"


def _describe_data(data: bytes) -> str | None:
    try:
        from ..data import Data, ImageData, PointCloudData, SensorData
    except ImportError:  # pragma: no cover - data types are part of the package
        return None
    try:
        value = Data.deserialize(data)
    except (DeserializationError, TypeError, ValueError):
        return None
    parts = [type(value).__name__]
    if isinstance(value, SensorData):
        parts.append(f"sensor={value.sensor_name}")
        parts.append(f"frame_id={value.frame_id}")
        parts.append(f"age={value.age() * 1e3:.1f}ms")
    if isinstance(value, ImageData) and value.shape is not None:
        parts.append(f"image={'x'.join(map(str, value.shape))}")
    elif isinstance(value, ImageData) and value.image is not None:
        parts.append(f"image={value.format} {len(value.image)} bytes")
    if isinstance(value, PointCloudData):
        parts.append(f"points={value.num_points}")
    parts.append(f"({fmt_bytes(len(data))})")
    # Names and formats are the sender's strings: escaped, and cut to a line's worth.
    return " ".join(escape_control(part, _FIELD_LIMIT) for part in parts)
