"""``msight play``: publish recorded messages again, with their recorded timing.

Messages are published as they were recorded (the exact bytes), in log time
order, each at ``start + (log time - first log time) / rate``. Several files
play one after the other (the parts of a split recording); ``--loop`` starts
again from the first. A recorder and a player chained through any backend give
back the same messages in the same order (on Kafka, per topic: topics are
separate logs).
"""

from __future__ import annotations

import argparse
import itertools
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..pubsub import get_pubsub
from ..topics import is_topic_pattern, subscription_name, topic_filter, topic_name
from .common import CliError, fmt_bytes, refuse_in_process, resolve_target
from .mcapfile import Recorded, read_info, read_messages

__all__ = [
    "PlayOptions",
    "add_parser",
    "paced",
    "recorded_messages",
    "recording_infos",
    "run_play",
]


@dataclass(frozen=True)
class PlayOptions:
    """What to play and how (see ``msight play --help``)."""

    files: Sequence[Path]
    rate: float = 1.0
    loop: bool = False
    topics: Sequence[str] | None = None
    remap: dict[str, str] = field(default_factory=dict)
    start: float = 0.0


def recorded_messages(files: Sequence[Path], topics: Sequence[str] | None) -> Iterator[Recorded]:
    """The messages of ``files``, one file after the other; ``topics`` may hold patterns."""
    if topics and any(is_topic_pattern(t) for t in topics):
        covers = topic_filter(topics)
        every = itertools.chain.from_iterable(read_messages(f, None) for f in files)
        return (m for m in every if covers(m.topic))
    return itertools.chain.from_iterable(read_messages(f, topics) for f in files)


def paced(
    messages: Iterable[Recorded], rate: float, stop: threading.Event, start: float = 0.0
) -> Iterator[Recorded]:
    """Yield each message when it is due: recorded gaps divided by ``rate``.

    Messages in the first ``start`` seconds of the recording are skipped. Ends
    early when ``stop`` is set.
    """
    first: int | None = None
    base = 0.0
    for message in messages:
        if first is None:
            first = message.log_time + int(start * 1e9)
            base = time.monotonic()
        offset = message.log_time - first
        if offset < 0:
            continue
        delay = base + offset / 1e9 / rate - time.monotonic()
        if delay > 0 and stop.wait(delay):
            return
        if stop.is_set():
            return
        yield message


class _Progress:
    """``playing 12.3/45.6 s  123/456 messages`` on one terminal line, twice a second."""

    def __init__(self, err: TextIO, total_s: float | None, total_n: int | None) -> None:
        self.err = err
        self.tty = bool(getattr(err, "isatty", lambda: False)())
        self.total_s = total_s
        self.total_n = total_n
        self.shown = 0.0

    def update(self, seconds: float, count: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.tty or (not force and now - self.shown < 0.5):
            return
        self.shown = now
        of_s = f"/{self.total_s:.1f}" if self.total_s is not None else ""
        of_n = f"/{self.total_n}" if self.total_n is not None else ""
        self.err.write(f"\rplaying {seconds:.1f}{of_s} s  {count}{of_n} messages ")
        self.err.flush()

    def end(self) -> None:
        if self.tty and self.shown:
            self.err.write("\n")


def play(
    backend: Any,
    options: PlayOptions,
    stop: threading.Event,
    progress: Callable[[float, int], None] | None = None,
) -> tuple[int, int]:
    """Publish the recording on ``backend``; return (messages, bytes) published.

    Blocks until done, or until ``stop`` is set.
    """
    remap = options.remap
    count = size = 0
    while not stop.is_set():
        first = None
        for message in paced(recorded_messages(options.files, options.topics), options.rate,
                             stop, options.start):  # fmt: skip
            first = message.log_time if first is None else first
            backend.publish(remap.get(message.topic, message.topic), message.data)
            count += 1
            size += len(message.data)
            if progress is not None:
                progress((message.log_time - first) / 1e9, count)
        if not options.loop or first is None:
            break
    return count, size


# --------------------------------------------------------------------------- command


def add_parser(sub: Any, backend_args: Callable[..., None]) -> None:
    """``msight play`` (called by :func:`msight_core.cli.build_parser`)."""
    p = sub.add_parser(
        "play",
        help="publish a recording again, with its recorded timing",
        description="Publish the messages of MCAP recordings (from msight record) on the "
        "configured backend, byte for byte, with the recorded timing. Several files play "
        "one after the other (a split recording). Ctrl-C stops.",
    )
    backend_args(p, embedded=False)
    p.add_argument("files", nargs="+", metavar="FILE", help="MCAP files to play, in order")
    p.add_argument("--rate", type=float, default=1.0, help="speed factor (2.0: twice as fast)")
    p.add_argument("--loop", action="store_true", help="start again at the end, until Ctrl-C")
    p.add_argument("--topics", nargs="+", metavar="TOPIC",
                   help="play only these topics (default: all)")  # fmt: skip
    p.add_argument("--remap", action="append", default=[], metavar="OLD=NEW",
                   help="publish topic OLD as NEW (repeatable)")  # fmt: skip
    p.add_argument("--start", type=float, default=0.0, metavar="S",
                   help="skip the first S seconds of the recording")  # fmt: skip
    p.set_defaults(run=run_play)


def recording_infos(files: Sequence[Path]) -> list[Any]:
    """The summary of each file, read before anything is published.

    Raises:
        OSError: a file cannot be read.
        CliError: a file is not an MCAP file.
    """
    try:
        return [read_info(f) for f in files]
    except ValueError as exc:
        raise CliError(str(exc)) from exc


def parse_remap(items: Sequence[str]) -> dict[str, str]:
    """``["a=b", ...]`` -> ``{"a": "b"}`` with both names validated.

    Raises:
        CliError: an item without ``=``.
        InvalidTopicError: a name that is not portable.
    """
    remap = {}
    for item in items:
        old, sep, new = item.partition("=")
        if not sep:
            raise CliError(f"--remap {item!r}: expected OLD=NEW", code=2)
        remap[topic_name(old.strip())] = topic_name(new.strip())
    return remap


def run_play(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run ``msight play``; SIGINT and SIGTERM stop it."""
    if not args.rate > 0:
        raise CliError("--rate must be positive", code=2)
    if args.start < 0:
        raise CliError("--start must be >= 0", code=2)
    files = [Path(f) for f in args.files]
    infos = recording_infos(files)
    options = PlayOptions(
        files=files, rate=args.rate, loop=args.loop,
        topics=[subscription_name(t) for t in args.topics] if args.topics else None,
        remap=parse_remap(args.remap), start=args.start,
    )  # fmt: skip
    target = resolve_target(args.backend, embedded="never")
    refuse_in_process(target, "play")
    for info in infos:
        if not info.complete:
            err.write(f"msight: {info.path} was not closed (no summary): playing it up to "
                      "its last complete chunk\n")  # fmt: skip
    total_s = total_n = None
    if all(i.complete for i in infos) and infos:
        total_n = sum(i.message_count or 0 for i in infos)
        total_s = max(i.end_time or 0 for i in infos) - min(i.start_time or 0 for i in infos)
        total_s = max(total_s / 1e9 - options.start, 0.0)
    env = dict(target.env)
    env.setdefault("MSIGHT_KAFKA_ORDERED", "true")  # one partition per topic: order kept
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = _Progress(err, total_s if not options.loop else None, total_n)
    started = time.monotonic()
    try:
        with get_pubsub(env=env) as backend:
            err.write(f"playing {', '.join(map(str, files))} on "
                      f"{target.description or target.backend} at x{options.rate:g}; "
                      "Ctrl-C to stop\n")  # fmt: skip
            err.flush()
            count, size = play(backend, options, stop, bar.update)
            backend.flush()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        bar.end()
    seconds = time.monotonic() - started
    how = "interrupted after" if stop.is_set() else "played"
    out.write(f"{how} {count} message(s), {fmt_bytes(size)}, in {seconds:.1f}s\n")
    return 0
