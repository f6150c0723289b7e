"""``msight bridge``: forward topics from one backend to another.

Each side has its own backend and settings: ``--from nats --from-url
nats://a:4222`` reads from one NATS server, ``--to kafka --to-url k:9092``
writes to a Kafka cluster, and ``--from-set``/``--to-set MSIGHT_X=V`` set any
other variable for one side only (the process's ``MSIGHT_*`` variables apply
to both). A status line on stderr every ``--status-interval`` seconds; SIGINT
or SIGTERM stop it cleanly (what was forwarded is confirmed, at-least-once
sources acknowledged) and the totals go to stdout.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from ..bridge import Bridge, BridgeStats, bridge_name, open_backend
from ..config import BACKENDS
from ..pubsub import PubSubBackend
from .common import CliError, fmt_bytes
from .play import parse_remap

__all__ = ["add_parser", "run_bridge", "status_line"]

_GROUPED = ("nats", "kafka")  # sources that get the bridge's name as group by default


def add_parser(sub: Any, backend_args: Callable[..., None]) -> None:
    """``msight bridge`` (called by :func:`msight_core.cli.build_parser`)."""
    p = sub.add_parser(
        "bridge",
        help="forward topics from one backend to another (shm -> nats, nats -> kafka ...)",
        description="Forward TOPICs (names, or patterns like camera1.> where the source "
        "supports them) from the --from backend to the --to backend: exact bytes, order kept "
        "per topic, the source topic name (with --prefix/--remap) on the destination. "
        "At-least-once from Kafka and NATS JetStream: the source is acknowledged after the "
        "destination confirmed. A message coming back with bytes this bridge forwarded "
        "within --loop-window seconds is an echo of a loop and is dropped. SIGINT/SIGTERM "
        "stop it cleanly.",
    )
    choices = list(BACKENDS)
    for side, word in (("from", "read from"), ("to", "write to")):
        p.add_argument(
            f"--{side}", dest=f"{side}_backend", required=True, choices=choices,
            metavar="BACKEND", help=f"backend to {word}: {', '.join(choices)}",
        )  # fmt: skip
        p.add_argument(
            f"--{side}-url", metavar="URL",
            help=f"server(s) to {word} (nats://h:4222, h:9092 for Kafka, h:6379 or "
            "redis://h:6379 for Redis; default: the MSIGHT_* variables)",
        )  # fmt: skip
        p.add_argument(
            f"--{side}-set", action="append", default=[], metavar="MSIGHT_VAR=VALUE",
            help="an MSIGHT_* setting for this side only (repeatable; default: none), e.g. "
            "MSIGHT_NATS_JETSTREAM=true",
        )  # fmt: skip
    p.add_argument("topics", nargs="+", metavar="TOPIC", help="topic names or patterns")
    p.add_argument(
        "--prefix", default="", help="put this before every destination name (default: none)"
    )
    p.add_argument("--remap", action="append", default=[], metavar="OLD=NEW",
                   help="forward source topic OLD as NEW (repeatable; default: none)")  # fmt: skip
    p.add_argument(
        "--name",
        help="bridge name: the source's Kafka consumer group / NATS queue group "
        "(default: msight-bridge-<hash of this configuration>, so a restart resumes)",
    )
    p.add_argument("--group", help="source group instead of the bridge name ('' for none)")
    p.add_argument("--status-interval", type=float, default=5.0, metavar="S",
                   help="seconds between status lines on stderr (0: none)")  # fmt: skip
    p.add_argument("--loop-window", type=float, default=10.0, metavar="S",
                   help="seconds an echo of a forwarded message is recognised (0: off)")  # fmt: skip
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    p.set_defaults(run=run_bridge)


def _settings(items: Sequence[str], option: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"{option} {item!r}: expected MSIGHT_VAR=VALUE", code=2)
        out[key.strip()] = value
    return out


def status_line(now: BridgeStats, before: BridgeStats | None, seconds: float) -> str:
    """``forwarded 1200 (240 msg/s, 1.2 MB/s) ...`` for one interval."""
    count = now.forwarded - (before.forwarded if before else 0)
    size = now.forwarded_bytes - (before.forwarded_bytes if before else 0)
    seconds = max(seconds, 1e-9)
    parts = [
        f"forwarded {now.forwarded} ({count / seconds:.0f} msg/s, {fmt_bytes(size / seconds)}/s)",
        f"total {fmt_bytes(now.forwarded_bytes)}",
    ]
    if now.confirmed or now.pending:
        parts.append(f"confirmed {now.confirmed}, pending {now.pending}")
    dropped = sum(now.source.get("dropped", {}).values()) if now.source else 0
    if dropped:
        parts.append(f"source dropped {dropped}")
    for label, value in (
        ("echoes dropped", now.echoes_dropped),
        ("loop dropped", now.loop_dropped),
        ("refused", sum(now.refused.values())),
        ("resent", now.resent),
        ("outage retries", now.outage_retries),
    ):
        if value:
            parts.append(f"{label} {value}")
    return "bridge: " + ", ".join(parts)


def run_bridge(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run ``msight bridge`` until SIGINT/SIGTERM (or ``--duration``)."""
    for side in ("from", "to"):
        if getattr(args, f"{side}_backend") == "memory":
            raise CliError(
                f"`msight bridge --{side} memory`: the memory backend only connects code "
                "inside one process, so nothing would reach or leave this command. Pick "
                "redis, nats, kafka or shm",
                code=2,
            )
    if not args.status_interval >= 0 or (args.duration is not None and not args.duration > 0):
        raise CliError("--status-interval must be >= 0 and --duration > 0", code=2)
    src_set = _settings(args.from_set, "--from-set")
    dst_set = _settings(args.to_set, "--to-set")
    remap = parse_remap(args.remap)
    name = args.name or bridge_name(
        args.from_backend, args.from_url, sorted(src_set.items()), args.to_backend,
        args.to_url, sorted(dst_set.items()), sorted(args.topics), args.prefix, sorted(remap.items()),
    )  # fmt: skip
    group = args.group if args.group is not None else (
        name if args.from_backend in _GROUPED else None
    )  # fmt: skip
    stop = threading.Event()
    bridge_ref: list[Bridge] = []

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()
        if bridge_ref:
            bridge_ref[0].stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    source: PubSubBackend | None = None
    destination: PubSubBackend | None = None
    started = time.monotonic()
    try:
        source = open_backend(args.from_backend, args.from_url, src_set, group_id=group or None)
        destination = open_backend(args.to_backend, args.to_url, dst_set, role="destination")
        bridge = Bridge(
            source, destination, args.topics, prefix=args.prefix, remap=remap,
            loop_window=args.loop_window,
        )  # fmt: skip
        bridge_ref.append(bridge)
        if stop.is_set():
            return 0
        bridge.start()
        err.write(
            f"bridge {name}: {args.from_backend} -> {args.to_backend}, topics "
            f"{' '.join(args.topics)}; Ctrl-C to stop\n"
        )
        err.flush()
        before: BridgeStats | None = None
        last = time.monotonic()
        deadline = None if args.duration is None else started + args.duration
        interval = args.status_interval or 0.5
        while not stop.is_set() and bridge.running:
            wait = interval if deadline is None else min(interval, deadline - time.monotonic())
            if stop.wait(max(wait, 0.0)) or (deadline is not None and time.monotonic() >= deadline):
                break
            if args.status_interval:
                now, stamp = bridge.stats(), time.monotonic()
                err.write(status_line(now, before, stamp - last) + "\n")
                err.flush()
                before, last = now, stamp
        bridge.stop()
        final = bridge.stats()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        try:
            if source is not None:
                source.close()
        finally:
            if destination is not None:
                destination.close()
    seconds = time.monotonic() - started
    out.write(
        f"bridge {name}: forwarded {final.forwarded} message(s), "
        f"{fmt_bytes(final.forwarded_bytes)}, in {seconds:.1f}s; confirmed {final.confirmed}, "
        f"echoes dropped {final.echoes_dropped}, refused {sum(final.refused.values())}\n"
    )
    out.flush()
    return 0
