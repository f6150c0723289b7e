"""``msight topics``, ``msight hz`` and ``msight bw``: what flows, how often, how much.

``hz`` and ``bw`` count messages as they arrive, without decoding them (as
``ros2 topic hz/bw``): over a window of the last N messages of each topic,
``hz`` prints the mean rate, ``(N - 1) / (last - first arrival)``, and the
minimum, maximum and standard deviation of the gaps; ``bw`` prints the bytes
per second over the same span and the mean, minimum and maximum message size.
A line per topic every ``--interval`` seconds, and a last one at the end.

``topics`` asks the broker, through the raw client of each backend:

- Redis: the topic registry (``MSIGHT:TOPICS``) and the channels with live
  subscribers (``PUBSUB CHANNELS``/``SHARDCHANNELS``, ``NUMSUB``);
- NATS: the JetStream streams, their subjects, messages and bytes (a plain
  NATS server does not tell clients which subjects have subscribers);
- Kafka: the topics with their partitions and replicas.

Names come from the broker, so from whoever can create topics there: they are
escaped before they reach the terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from ..config import kafka_client_conf, load_kafka_config, load_nats_config, mask_url
from ..errors import MissingDependencyError
from ..pubsub import get_pubsub
from ..topics import is_topic_pattern, subscription_set
from .common import CliError, Target, fmt_bytes, refuse_in_process, render_table, resolve_target
from .tools import escape_control

__all__ = ["RateWindow", "add_parsers", "run_rate", "run_topics"]

logger = logging.getLogger(__name__)


class RateWindow:
    """Arrival times and sizes of the last ``window`` messages of one topic."""

    def __init__(self, window: int) -> None:
        self.times: collections.deque[float] = collections.deque(maxlen=window)
        self.sizes: collections.deque[int] = collections.deque(maxlen=window)
        self.total = 0

    def add(self, when: float, size: int) -> None:
        self.times.append(when)
        self.sizes.append(size)
        self.total += 1

    def hz(self) -> tuple[float, float, float, float, int] | None:
        """(rate, min gap, max gap, std of gaps, window) or ``None`` below two messages."""
        n = len(self.times)
        if n < 2 or self.times[-1] <= self.times[0]:
            return None
        times = list(self.times)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        mean = sum(gaps) / len(gaps)
        std = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps))
        return (n - 1) / (times[-1] - times[0]), min(gaps), max(gaps), std, n

    def bw(self) -> tuple[float, float, int, int, int] | None:
        """(bytes/s, mean size, min size, max size, window) or ``None`` below two messages."""
        n = len(self.times)
        if n < 2 or self.times[-1] <= self.times[0]:
            return None
        sizes = list(self.sizes)
        rate = sum(sizes[1:]) / (self.times[-1] - self.times[0])
        return rate, sum(sizes) / n, min(sizes), max(sizes), n


def format_hz(topic: str, window: RateWindow) -> str:
    stats = window.hz()
    if stats is None:
        return f"{topic}: {window.total} message(s) so far, no rate yet"
    rate, low, high, std, n = stats
    return (f"{topic}: average rate: {rate:.3f}  min: {low:.4f}s max: {high:.4f}s "
            f"std dev: {std:.5f}s window: {n}")  # fmt: skip


def format_bw(topic: str, window: RateWindow) -> str:
    stats = window.bw()
    if stats is None:
        return f"{topic}: {window.total} message(s) so far, no bandwidth yet"
    rate, mean, low, high, n = stats
    return (f"{topic}: {fmt_bytes(rate)}/s ({rate:.0f} B/s) from {n} messages  message size "
            f"mean: {fmt_bytes(mean)} min: {fmt_bytes(low)} max: {fmt_bytes(high)}")  # fmt: skip


def run_rate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``msight hz`` / ``msight bw``: report until Ctrl-C, SIGTERM or ``--duration``."""
    topics = subscription_set(args.topics)
    if args.window < 2:
        raise CliError("--window must be at least 2", code=2)
    if not args.interval > 0:
        raise CliError("--interval must be positive", code=2)
    fmt = format_hz if args.command == "hz" else format_bw
    target = resolve_target(args.backend, embedded="never")
    refuse_in_process(target, args.command)
    # A pattern's topics get their windows as their messages come.
    windows = {t: RateWindow(args.window) for t in topics if not is_topic_pattern(t)}
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with get_pubsub(env=target.env) as backend:
            for topic in topics:
                backend.subscribe(topic)
            err.write(f"subscribed to {', '.join(topics)} on {target.backend}; Ctrl-C to stop\n")
            err.flush()
            started = time.monotonic()
            deadline = None if args.duration is None else started + args.duration
            report = started + args.interval
            while not stop.is_set():
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                if now >= report:
                    out.writelines(fmt(t, w) + "\n" for t, w in windows.items() if w.total)
                    out.flush()
                    report = now + args.interval
                until = report if deadline is None else min(report, deadline)
                message = backend.receive(max(min(until - now, 0.2), 0.0))
                if message is not None:
                    arrived = time.monotonic()
                    window = windows.get(message.topic)
                    if window is None:
                        window = windows[message.topic] = RateWindow(args.window)
                    window.add(arrived, len(message.data))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    out.writelines(fmt(t, w) + "\n" for t, w in windows.items())
    return 0


# --------------------------------------------------------------------------- topics


def run_topics(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``msight topics``: a table of what the broker knows."""
    target = resolve_target(args.backend, embedded="never")
    refuse_in_process(target, "topics")
    lister = {"redis": _redis_topics, "nats": _nats_topics, "kafka": _kafka_topics}.get(
        target.backend
    )
    if lister is None:
        raise CliError(f"the {target.backend} backend keeps no list of topics", code=2)
    headers, rows, notes = lister(target, args.timeout)
    if not args.all:
        rows = [r for r in rows if not str(r[0]).startswith("_")]
    rows = [[escape_control(str(c), 120) for c in row] for row in sorted(rows)]
    out.write(render_table(headers, rows) + "\n" if rows else "no topics\n")
    err.writelines(f"msight: {note}\n" for note in notes)
    return 0


def _redis_topics(target: Target, timeout: float) -> tuple[list[str], list[list[Any]], list[str]]:
    from ..topics import list_topics
    from ..utils import get_redis_client

    client = get_redis_client(env=target.env, socket_timeout=timeout)
    try:
        registry = list_topics(client)
        live: dict[str, int] = {}
        for command in ("CHANNELS", "SHARDCHANNELS"):
            try:
                names = client.execute_command("PUBSUB", command)
            except Exception:
                logger.debug("PUBSUB %s failed", command, exc_info=True)
                continue
            names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]
            if names:
                counts = client.execute_command(
                    "PUBSUB", "NUMSUB" if command == "CHANNELS" else "SHARDNUMSUB", *names
                )
                for name, n in zip(counts[::2], counts[1::2]):
                    key = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
                    live[key] = live.get(key, 0) + int(n)
    finally:
        client.close()
    rows = [
        [name, live.get(name, 0), (registry[name].data_type or "-") if name in registry else "-"]
        for name in set(registry) | set(live)
    ]
    return ["TOPIC", "SUBSCRIBERS", "REGISTERED TYPE"], rows, []


def _nats_topics(target: Target, timeout: float) -> tuple[list[str], list[list[Any]], list[str]]:
    try:
        import nats
        from nats.js.errors import NotFoundError, ServiceUnavailableError
    except ImportError:
        raise MissingDependencyError("nats-py", "nats") from None
    from ..config import nats_connect_options

    config = load_nats_config(env=target.env)
    options = nats_connect_options(config)
    options.update(allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=timeout)

    async def ask() -> list[Any] | None:
        nc = await nats.connect(**options)
        try:
            return list(await nc.jetstream(timeout=timeout).streams_info())
        except (ServiceUnavailableError, NotFoundError, nats.errors.NoRespondersError):
            return None
        finally:
            await nc.close()

    servers = mask_url(", ".join(config.servers))
    try:
        streams = asyncio.run(ask())
    except (OSError, nats.errors.Error, asyncio.TimeoutError) as exc:
        raise CliError(f"cannot ask the NATS server at {servers}: {type(exc).__name__}") from exc
    note = (
        "a NATS server does not tell clients which plain subjects have subscribers; "
        "listed: JetStream streams"
    )
    if streams is None:
        return ["STREAM"], [], [f"JetStream is off at {servers}: no streams to list", note]
    rows = [
        [s.config.name, " ".join(s.config.subjects or []), s.state.messages,
         fmt_bytes(s.state.bytes), s.state.consumer_count]
        for s in streams
    ]  # fmt: skip
    return ["STREAM", "SUBJECTS", "MESSAGES", "BYTES", "CONSUMERS"], rows, [note]


def _kafka_topics(target: Target, timeout: float) -> tuple[list[str], list[list[Any]], list[str]]:
    try:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient
    except ImportError:
        raise MissingDependencyError("confluent-kafka", "kafka") from None
    config = load_kafka_config(env=target.env)
    admin = AdminClient({**kafka_client_conf(config), "logger": logger})
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        servers = mask_url(", ".join(config.servers))
        raise CliError(f"cannot list the topics of Kafka at {servers}: {exc.args[0]}") from exc
    rows = []
    for name, topic in metadata.topics.items():
        partitions = list(topic.partitions.values())
        replicas = len(partitions[0].replicas) if partitions else 0
        rows.append([name, len(partitions), replicas])
    return ["TOPIC", "PARTITIONS", "REPLICAS"], rows, []


# --------------------------------------------------------------------------- parsers


def add_parsers(sub: Any, backend_args: Callable[..., None]) -> None:
    """``msight topics``, ``hz`` and ``bw`` (called by :func:`msight_core.cli.build_parser`)."""
    p = sub.add_parser(
        "topics",
        help="list what the broker knows: topics, subscribers, partitions, streams",
        description="List the topics the configured broker knows: on Redis the topic "
        "registry and the channels with subscribers, on NATS the JetStream streams, on "
        "Kafka the topics with their partitions.",
    )
    backend_args(p, embedded=False)
    p.add_argument("--all", action="store_true", help="also show internal names (leading _)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the broker")
    p.set_defaults(run=run_topics)
    for name, what, window in (("hz", "message rate", 10_000), ("bw", "bandwidth", 100)):
        p = sub.add_parser(
            name,
            help=f"{what} of topics, counted without decoding (like ros2 topic {name})",
            description=f"Print the {what} of each TOPIC over a window of its last messages, "
            "every --interval seconds and once more at the end. Payloads are counted, never "
            "decoded.",
        )
        backend_args(p, embedded=False)
        p.add_argument("topics", nargs="+", metavar="TOPIC", help="topics (or patterns) to measure")
        p.add_argument("--window", "-w", type=int, default=window,
                       help="messages per topic the figures cover")  # fmt: skip
        p.add_argument("--interval", type=float, default=1.0, help="seconds between reports")
        p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
        p.set_defaults(run=run_rate)
