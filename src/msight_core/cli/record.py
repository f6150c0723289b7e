"""``msight record``: topics to an MCAP file, exact bytes, nothing waits on the disk.

Two threads share the work. The receiving thread takes each message from the
backend, stamps its receive time and hands it to a bounded in-memory queue; it
never touches the disk, so a slow disk shows up as counted drops, never as a
subscriber falling behind the broker. The writer thread takes messages from the
queue and appends them to :class:`~msight_core.cli.mcapfile.McapFileWriter`.

The drop count printed at the end adds what the writer queue refused (the disk
fell behind; ``--buffer``) and what the backend's receive buffers dropped (the
receiving thread fell behind; ``MSIGHT_QUEUE_*``, ``MSIGHT_SHM_BUFFER_DEPTH``).
What a best-effort broker loses before delivery (Redis disconnecting a lagging
subscriber) never reaches the recorder: the backend logs it as a warning.

Each message is stored as received. Its log time is the receive time (wall
clock, strictly increasing within a recording); its publish time is the
capture time of a decodable :class:`~msight_core.data.SensorData` message, else
the receive time. Each topic gets one channel; its schema name and its
``msight.data_type`` metadata name the Data type of its first message.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from ..errors import DeserializationError
from ..pubsub import get_pubsub
from ..topics import subscription_set
from .common import CliError, fmt_bytes, parse_size, refuse_in_process, resolve_target
from .mcapfile import COMPRESSIONS, McapFileWriter

__all__ = ["RecordOptions", "RecordResult", "Recorder", "add_parser", "run_record"]

MiB = 1024 * 1024
#: Message encoding of channels whose messages are msight Data.
DATA_ENCODING = "msight"
#: Message encoding of channels of other payloads (text, JSON, opaque bytes).
BYTES_ENCODING = "application/octet-stream"


@dataclass(frozen=True)
class RecordOptions:
    """How to record (see ``msight record --help``)."""

    output: Path
    compression: str = "none"
    chunk_size: int = 4 * MiB
    duration: float | None = None
    max_size: int | None = None
    split_size: int | None = None
    buffer_bytes: int = 512 * MiB
    force: bool = False
    crc: bool = True


@dataclass
class RecordResult:
    """What a recording wrote and lost."""

    files: list[Path] = field(default_factory=list)
    messages: int = 0
    bytes: int = 0
    seconds: float = 0.0
    topics: int = 0
    dropped_writer: int = 0  # the writer queue was full (the disk was too slow)
    dropped_subscriber: int = 0  # the backend's receive queue was full
    stopped_by: str = ""

    @property
    def dropped(self) -> int:
        return self.dropped_writer + self.dropped_subscriber


class _Clock:
    """Wall-clock nanoseconds that never go backwards and never repeat."""

    def __init__(self) -> None:
        self._wall0 = time.time_ns()
        self._mono0 = time.monotonic_ns()
        self._last = 0

    def __call__(self) -> int:
        now = self._wall0 + time.monotonic_ns() - self._mono0
        if now <= self._last:
            now = self._last + 1
        self._last = now
        return now


class _Queue:
    """A bounded queue of received messages; put() never waits, it drops and counts."""

    def __init__(self, max_bytes: int) -> None:
        self._items: collections.deque[tuple[str, Any, int]] = collections.deque()
        self._cond = threading.Condition()
        self._bytes = 0
        self.max_bytes = max_bytes
        self.closed = False
        self.dropped = 0

    def put(self, topic: str, data: Any, stamp: int) -> bool:
        with self._cond:
            if self._bytes + len(data) > self.max_bytes and self._items:
                self.dropped += 1
                return False
            self._items.append((topic, data, stamp))
            self._bytes += len(data)
            self._cond.notify()
            return True

    def take(self, timeout: float) -> list[tuple[str, Any, int]] | None:
        """Everything queued (waiting up to ``timeout``); ``None`` once closed and empty."""
        with self._cond:
            if not self._items and not self.closed:
                self._cond.wait(timeout)
            if not self._items:
                return None if self.closed else []
            items = list(self._items)
            self._items.clear()
            self._bytes = 0
            return items

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


def _lower_priority() -> None:
    """Give the calling (writer) thread a lower CPU priority than the receiving ones.

    On a busy machine the threads that take messages off the broker must run
    first: the writer catches up from the queue. Linux applies ``setpriority``
    to one thread when given its id; elsewhere this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + 5, 19))
    except (AttributeError, OSError):  # pragma: no cover - not permitted or not supported
        pass


def split_path(base: Path, index: int) -> Path:
    """``rec.mcap`` -> ``rec_000.mcap`` (the files of a recording split by size)."""
    return base.with_name(f"{base.stem}_{index:03d}{base.suffix or '.mcap'}")


def inspect_payload(data: Any) -> tuple[str, int | None]:
    """The Data type of a payload (``""`` if not msight Data) and its capture time in ns."""
    from ..data import Data, SensorData

    try:
        value = Data.deserialize(data)
    except (DeserializationError, TypeError, ValueError):
        return "", None
    capture = None
    if isinstance(value, SensorData):
        ts = value.capture_timestamp
        if isinstance(ts, (int, float)) and math.isfinite(ts) and 0 <= ts < 2**63 / 1e9:
            capture = int(ts * 1e9)
    return type(value).__data_tag__, capture


class Recorder:
    """Records ``topics`` from ``backend`` into MCAP file(s).

    Args:
        backend: a subscribed-to-nothing msight backend (anything with
            ``subscribe()`` and ``receive(timeout)``); closed by the caller.
        topics: topic names to record.
        options: output file, limits, compression.
        metadata: extra key/values for the file's ``msight`` metadata record.
    """

    def __init__(
        self,
        backend: Any,
        topics: Sequence[str],
        options: RecordOptions,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self.topics = list(topics)
        self.options = options
        self.metadata = dict(metadata or {})
        self.result = RecordResult(topics=len(self.topics))
        self._queue = _Queue(options.buffer_bytes)
        self._clock = _Clock()
        self._writer: McapFileWriter | None = None
        self._done_bytes = 0  # bytes in files already closed
        self._full = threading.Event()
        self._error: BaseException | None = None

    def targets(self) -> list[Path]:
        """The file names this recording writes first (for the overwrite check)."""
        if self.options.split_size:
            return [split_path(self.options.output, 0)]
        return [self.options.output]

    def run(
        self, stop: threading.Event, on_ready: Callable[[], None] | None = None
    ) -> RecordResult:
        """Subscribe, record until ``stop`` is set or a limit is reached, close the file.

        Blocks. Messages already received when it stops are written.

        Raises:
            MsightError: the backend failed to subscribe or receive.
            OSError: the file could not be written (what was written is closed cleanly).
        """
        opts = self.options
        for topic in self.topics:
            self.backend.subscribe(topic)
        self._open_file()
        writer = threading.Thread(target=self._write_loop, name="msight-record-writer")
        writer.start()
        started = time.monotonic()
        deadline = None if opts.duration is None else started + opts.duration
        if on_ready is not None:
            on_ready()
        try:
            self.result.stopped_by = self._receive_loop(stop, deadline)
            if self.result.stopped_by != "size limit":
                self._drain(time.monotonic() + 2.0)
        finally:
            self._queue.close()
            writer.join()
            self.result.seconds = time.monotonic() - started
            stats = getattr(self.backend, "stats", None)
            if callable(stats):
                self.result.dropped_subscriber = sum(stats().get("dropped", {}).values())
            self.result.dropped_writer = self._queue.dropped
        if self._error is not None:
            raise self._error
        return self.result

    # -- receiving thread -------------------------------------------------------------

    def _receive_loop(self, stop: threading.Event, deadline: float | None) -> str:
        receive, put, clock = self.backend.receive, self._queue.put, self._clock
        while True:
            if stop.is_set():
                return "signal"
            if self._full.is_set():
                return "size limit" if self._error is None else "error"
            wait = 0.2
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return "duration"
            message = receive(wait)
            if message is not None:
                put(message.topic, message.data, clock())

    def _drain(self, until: float) -> None:
        """Record what the backend already holds (received before the stop)."""
        while time.monotonic() < until and not self._full.is_set():
            message = self.backend.receive(0)
            if message is None:
                return
            self._queue.put(message.topic, message.data, self._clock())

    # -- writer thread ----------------------------------------------------------------

    def _write_loop(self) -> None:
        _lower_priority()
        try:
            while True:
                items = self._queue.take(0.25)
                if items is None:
                    break
                for topic, data, stamp in items:
                    if not self._full.is_set():
                        self._write(topic, data, stamp)
                if self._writer is not None:
                    self._writer.tick()
        except BaseException as exc:  # noqa: BLE001 - handed to the receiving thread
            self._fail(exc)
        finally:
            try:
                self._close_file()
            except BaseException as exc:  # noqa: BLE001 - handed to the receiving thread
                self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._full.set()
        self._queue.close()

    def _write(self, topic: str, data: Any, stamp: int) -> None:
        opts = self.options
        if opts.max_size is not None and (
            self._done_bytes + self._file.size_after(len(data)) > opts.max_size
        ):
            self._full.set()
            return
        data_type, capture = inspect_payload(data)
        if not self._file.has_channel(topic):
            metadata = {"msight.data_type": data_type} if data_type else {}
            encoding = DATA_ENCODING if data_type else BYTES_ENCODING
            self._file.add_channel(topic, data_type, encoding, metadata)
        self._file.write(topic, stamp, stamp if capture is None else capture, data)
        self.result.messages += 1
        self.result.bytes += len(data)
        if opts.split_size is not None and self._file.size >= opts.split_size:
            self._close_file()
            self._open_file()

    @property
    def _file(self) -> McapFileWriter:
        assert self._writer is not None
        return self._writer

    def _open_file(self) -> None:
        opts = self.options
        path = split_path(opts.output, len(self.result.files)) if opts.split_size else opts.output
        from .. import __version__

        meta = {"msight_core": __version__, "topics": ",".join(self.topics), **self.metadata}
        self._writer = McapFileWriter(
            path, opts.compression, opts.chunk_size, library=f"msight-core {__version__}",
            metadata=meta, crc=opts.crc,
        )  # fmt: skip
        self.result.files.append(path)

    def _close_file(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()
            self._done_bytes += writer.size


# --------------------------------------------------------------------------- command


def add_parser(sub: Any, backend_args: Callable[..., None]) -> None:
    """``msight record`` (called by :func:`msight_core.cli.build_parser`)."""
    p = sub.add_parser(
        "record",
        help="record topics to an MCAP file (exact bytes, receive and capture times)",
        description="Record every message of the TOPICs to an MCAP file, as received: one "
        "channel per topic, the receive time as log time, the capture time of msight "
        "sensor data as publish time. Ctrl-C, SIGTERM, --duration or --max-size close the "
        "file cleanly; a file cut short by a crash stays readable up to its last chunk "
        "(at most 1 s or --chunk-size lost). The drop count is printed at the end.",
    )
    backend_args(p, embedded=False)
    p.add_argument(
        "topics",
        nargs="+",
        metavar="TOPIC",
        help="topics to record, or patterns (camera1.>, camera1.*.frames) where the backend has them",
    )
    p.add_argument(
        "-o", "--output", metavar="FILE", default=None,
        help="MCAP file to write (default: msight-<date>-<time>.mcap)",
    )  # fmt: skip
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    p.add_argument("--max-size", metavar="SIZE", help="stop before the files exceed SIZE (10G)")
    p.add_argument(
        "--split-size", metavar="SIZE",
        help="start a new file every SIZE: FILE_000.mcap, FILE_001.mcap, ...",
    )  # fmt: skip
    p.add_argument(
        "--compression",
        choices=COMPRESSIONS,
        default="none",
        help="compression of each chunk (none keeps up with the fastest sensors)",
    )
    p.add_argument("--chunk-size", metavar="SIZE", default="4M", help="bytes per chunk")
    p.add_argument(
        "--buffer", metavar="SIZE", default="512M",
        help="memory for messages waiting for the disk; beyond it they are dropped and counted",
    )  # fmt: skip
    p.add_argument(
        "--no-crc", dest="crc", action="store_false",
        help="skip the CRC-32 of each chunk: less CPU per frame, but a damaged chunk "
        "goes unnoticed when read",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(run=run_record)


def _options(args: argparse.Namespace) -> RecordOptions:
    output = args.output or datetime.now().strftime("msight-%Y%m%d-%H%M%S.mcap")
    if args.duration is not None and not args.duration > 0:
        raise CliError("--duration must be positive", code=2)
    return RecordOptions(
        output=Path(output), compression=args.compression,
        chunk_size=parse_size(args.chunk_size), duration=args.duration,
        max_size=parse_size(args.max_size) if args.max_size else None,
        split_size=parse_size(args.split_size) if args.split_size else None,
        buffer_bytes=parse_size(args.buffer), force=args.force, crc=args.crc,
    )  # fmt: skip


def run_record(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run ``msight record``; SIGINT and SIGTERM stop it cleanly."""
    topics = subscription_set(args.topics)
    options = _options(args)
    target = resolve_target(args.backend, embedded="never")
    refuse_in_process(target, "record")
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with get_pubsub(env=target.env) as backend:
            recorder = Recorder(backend, topics, options, {"backend": target.backend})
            for path in recorder.targets():
                if path.exists() and not options.force:
                    raise CliError(f"{path} exists: pick another --output or add --force")

            def ready() -> None:
                err.write(
                    f"recording {', '.join(topics)} from {target.description or target.backend}"
                    f" to {recorder.targets()[0]}; Ctrl-C to stop\n"
                )
                err.flush()

            try:
                result = recorder.run(stop, on_ready=ready)
            finally:  # also when it failed: what was written, and the drop count
                if recorder.result.files:
                    out.write(describe_result(recorder.result) + "\n")
                    out.flush()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if result.dropped:
        err.write(
            f"msight: {result.dropped} message(s) dropped: {result.dropped_writer} because the "
            f"disk fell behind (raise --buffer), {result.dropped_subscriber} because receiving "
            "fell behind (the backend's receive buffers: MSIGHT_QUEUE_*, MSIGHT_SHM_*)\n"
        )
    return 0


def describe_result(result: RecordResult) -> str:
    """One line: what was recorded, how fast, and the drop count (always shown)."""
    rate = result.bytes / result.seconds if result.seconds > 0 else 0.0
    files = ", ".join(str(p) for p in result.files)
    why = f", stopped by {result.stopped_by}" if result.stopped_by else ""
    return (
        f"recorded {result.messages} message(s), {fmt_bytes(result.bytes)}, on "
        f"{result.topics} topic(s) in {result.seconds:.1f}s ({fmt_bytes(rate)}/s) to {files}"
        f"{why}; dropped {result.dropped}"
    )
