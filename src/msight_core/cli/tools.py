"""``msight broker``, ``msight pub`` and ``msight sub`` (alias ``msight echo``).

``msight sub --out DIR`` saves each message as it arrived (``.bin``) and, next
to it, what a person wants to open: a decodable raw image as a PNG (8 or 16 bit
gray, RGB from msight's BGR, or RGBA), an encoded image in its own format
(``.jpg``/``.png``), and every other array of the message as a ``.npy``. The PNG
encoder is the few lines of :func:`png_bytes` (zlib), not matplotlib's
``imsave``, which maps 2-D arrays through a colour map and rescales them.

What ``msight sub`` prints comes from whoever could publish on the topic: every
received string goes through :func:`escape_control` before it reaches the
terminal, so a payload cannot send escape sequences (retitle the window, clear
the screen, move the cursor). ``--raw`` is the exception: it writes the bytes
unchanged, for pipes and files.
"""

from __future__ import annotations

import dataclasses
import shlex
import signal
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np

from ..config import backend_name
from ..errors import DeserializationError
from ..pubsub import get_pubsub
from ..topics import subscription_name, topic_name
from .common import CliError, Target, base_env, fmt_bytes, refuse_in_process, start_embedded

__all__ = [
    "broker_kind",
    "describe_payload",
    "escape_control",
    "png_bytes",
    "run_broker",
    "run_pub",
    "run_sub",
    "save_decoded",
]

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


def broker_kind(positional: str | None, option: str | None) -> str:
    """The broker ``msight broker`` runs: ``--backend``, the positional, or the configured one.

    Raises:
        CliError: both given and different, or the configured backend has no broker.
    """
    if positional and option and positional != option:
        raise CliError(f"msight broker {positional} --backend {option}: pick one", code=2)
    kind = option or positional or backend_name(base_env())
    if kind not in ("redis", "nats", "kafka"):
        raise CliError(f"the {kind} backend needs no broker: run one of redis, nats, kafka "
                       "(msight broker --backend nats)", code=2)  # fmt: skip
    return kind


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
    refuse_in_process(target, "pub")
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
    refuse_in_process(target, "sub")
    name = subscription_name(topic)
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
                stem = directory / f"{message.topic}.{received:06d}"
                path = stem.with_name(stem.name + ".bin")
                path.write_bytes(message.data)
                out.writelines(
                    f"{escape_control(str(saved))}\n"
                    for saved in [path, *save_decoded(message.data, stem)]
                )
            elif raw:
                out.flush()
                sys.stdout.buffer.write(message.data + b"\n")
                sys.stdout.buffer.flush()
                continue
            elif name != message.topic:  # a pattern: say which topic it came from
                out.write(f"{message.topic}: {describe_payload(message.data)}\n")
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


# --------------------------------------------------------------------------- --out files


def save_decoded(data: bytes, stem: Path) -> list[Path]:
    """Save what a person opens from a decodable message next to ``stem``.bin.

    A raw image becomes ``stem.png`` (uint8/uint16 with 1-4 channels; else
    ``stem.image.npy``), encoded image bytes ``stem.jpg``/``stem.png``, and every
    other array field ``stem.<field>.npy``. Nothing for a payload that is not
    msight Data. Returns the paths written.
    """
    from ..data import Data, ImageData

    try:
        value = Data.deserialize(data)
    except (DeserializationError, TypeError, ValueError):
        return []
    written: list[Path] = []

    def save(suffix: str, content: bytes) -> None:
        path = stem.with_name(stem.name + suffix)
        path.write_bytes(content)
        written.append(path)

    for f in dataclasses.fields(value):
        item = getattr(value, f.name)
        if isinstance(value, ImageData) and f.name == "image" and item is not None:
            if isinstance(item, bytes):
                ext = {"jpeg": ".jpg", "png": ".png"}.get(value.format, "." + value.format[:8])
                save(ext if ext[1:].isalnum() else ".img", item)
                continue
            png = png_bytes(item, bgr=True)
            if png is not None:
                save(".png", png)
                continue
        if isinstance(item, np.ndarray):
            save(f".{f.name}.npy", _npy(item))
    return written


def _npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def png_bytes(image: np.ndarray, bgr: bool = False) -> bytes | None:
    """A PNG of ``image`` (``(H, W)`` or ``(H, W, 1-4)`` of uint8 or uint16), or ``None``.

    Exact pixels, no scaling. With ``bgr`` a 3- or 4-channel image is taken as
    BGR(A), OpenCV's and msight's order, and written as RGB(A).
    """
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.dtype not in (np.uint8, np.uint16) or not 1 <= image.shape[2] <= 4:
        return None
    height, width, channels = image.shape
    if height == 0 or width == 0:
        return None
    if bgr and channels >= 3:
        image = image[:, :, [2, 1, 0, 3][:channels]]
    depth = 8 * image.dtype.itemsize
    rows = np.ascontiguousarray(image, dtype=image.dtype.newbyteorder(">")).reshape(height, -1)
    raw = np.empty((height, rows.shape[1] * rows.itemsize + 1), np.uint8)
    raw[:, 0] = 0  # filter type None on every row
    raw[:, 1:] = rows.view(np.uint8).reshape(height, -1)
    color = {1: 0, 2: 4, 3: 2, 4: 6}[channels]  # gray, gray+alpha, RGB, RGBA

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"".join((
        b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", header),
        chunk(b"IDAT", zlib.compress(raw.tobytes(), 1)), chunk(b"IEND", b""),
    ))  # fmt: skip
