"""The ``msight`` command line (also ``python -m msight_core``).

Commands::

    msight demo      stream synthetic camera frames and point clouds, live table
    msight broker    run an embedded redis|nats|kafka broker in the foreground
    msight pub       publish stdin or a file to a topic
    msight sub       print or save what arrives on a topic (alias: echo)
    msight record    record topics to an MCAP file
    msight play      publish a recording again, with its recorded timing
    msight view      a Foxglove WebSocket server showing live topics or a recording
    msight bridge    forward topics from one backend to another (shm -> nats, ...)
    msight topics    what the broker knows: topics, subscribers, partitions, streams
    msight hz        message rate of topics (min/max/std of the gaps)
    msight bw        bandwidth of topics (bytes/s, message sizes)
    msight bench     throughput and latency vs message size, msight vs raw client
    msight doctor    resolved configuration, connection check, broker limits

Thin by design: arguments -> configuration -> public API; the commands live in
the modules of this package. Errors print one line and exit non-zero: 1 for a
failure, 2 for bad arguments, 130 for an interrupt during shutdown. Commands
that talk to other processes (pub, sub, record, play, view, hz, bw, topics)
refuse the in-process ``memory`` backend with exit code 2: nothing would reach
them or leave them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from .. import __version__
from ..config import BACKENDS
from ..errors import MissingDependencyError, MsightError
from .common import HelpFormatter

__all__ = ["build_parser", "main"]

_BROKERS = ("redis", "nats", "kafka")  # what `msight broker` can run


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)  # defaults shown in --help
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"msight: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``msight`` command."""
    parser = _Parser(
        prog="msight",
        description="MSight pub/sub over Redis, NATS and Kafka: demo, tools and checks.",
        epilog="The backend comes from MSIGHT_PUBSUB_BACKEND (redis, nats, kafka, memory, shm; "
        "default redis) and the MSIGHT_* variables of that backend.",
    )
    parser.add_argument("--version", action="version", version=f"msight-core {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)"
    )
    parser.add_argument(
        "--traceback", action="store_true", help="show the traceback of an error (debugging)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def backend_args(p: argparse.ArgumentParser, embedded: bool) -> None:
        p.add_argument(
            "--backend", choices=BACKENDS,
            help="backend for this run (default: MSIGHT_PUBSUB_BACKEND, else redis)",
        )  # fmt: skip
        if embedded:
            group = p.add_mutually_exclusive_group()
            group.add_argument(
                "--embedded", action="store_const", const="always", dest="embedded",
                help="always start an embedded broker",
            )  # fmt: skip
            group.add_argument(
                "--no-embedded", action="store_const", const="never", dest="embedded",
                help="fail instead of starting an embedded broker",
            )  # fmt: skip
            p.set_defaults(embedded="auto")

    p = sub.add_parser(
        "demo",
        help="stream synthetic frames through a processing node (live table)",
        description="Stream synthetic camera frames and point clouds through a processing "
        "node to sinks, with a live table of rates, latency and drops. Starts an embedded "
        "broker when none is configured or reachable. Ctrl-C stops it cleanly.",
    )
    backend_args(p, embedded=True)
    p.add_argument("--duration", type=float, default=10.0, help="seconds to run (default 10)")
    p.add_argument("--rate", type=float, default=10.0, help="frames per second per sensor")
    p.add_argument("--frame", default="1920x1080", help="camera frame WIDTHxHEIGHT (x3 bytes)")
    p.add_argument("--points", type=int, default=100_000, help="lidar points per cloud")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="also write the summary")
    p.add_argument(
        "--metrics-port", type=int, metavar="PORT",
        help="serve Prometheus /metrics of the nodes on PORT (0: any free port; extra 'metrics')",
    )  # fmt: skip

    p = sub.add_parser(
        "broker",
        help="run an embedded broker in the foreground",
        description="Run an embedded broker from the pinned wheels and print the MSIGHT_* "
        "exports that point at it. Ctrl-C stops it.",
    )
    p.add_argument(
        "kind", nargs="?", choices=_BROKERS, metavar="{redis,nats,kafka}",
        help="same as --backend (kept for scripts)",
    )  # fmt: skip
    p.add_argument(
        "--backend", choices=_BROKERS,
        help="broker to run (default: MSIGHT_PUBSUB_BACKEND, else redis)",
    )  # fmt: skip
    p.add_argument("--port", type=int, help="port to listen on (default: a free one)")

    p = sub.add_parser(
        "pub",
        help="publish stdin or a file to a topic",
        description="Publish stdin (or --file) to TOPIC, one message per line (without the "
        "line end) or all of it as one message (--whole). Lines arrive in order on every "
        "backend (on Kafka through one partition unless MSIGHT_KAFKA_ORDERED says otherwise).",
    )
    backend_args(p, embedded=False)
    p.add_argument("topic", help="topic to publish to")
    p.add_argument("--file", "-f", help="read from this file instead of stdin")
    p.add_argument("--whole", action="store_true", help="send everything as one message")

    p = sub.add_parser(
        "sub",
        aliases=["echo"],
        help="print or save what arrives on a topic",
        description="Print what arrives on TOPIC, one line per message (msight Data as a "
        "summary, text as it is, binary as a hex preview), or save each message to a file "
        "(--out). Exits 1 if --count messages did not arrive within --timeout.",
    )
    backend_args(p, embedded=False)
    p.add_argument(
        "topic", help="topic to subscribe to, or a pattern (camera1.>, camera1.*.frames)"
    )
    p.add_argument("--count", "-n", type=int, help="stop after N messages")
    p.add_argument("--group", "-g", help="join this load-balancing group (nats, kafka)")
    p.add_argument("--timeout", "-t", type=float, help="stop after this many seconds")
    p.add_argument(
        "--out", dest="out_dir", metavar="DIR",
        help="save each message to a file (.bin), images also as PNG, arrays as .npy",
    )  # fmt: skip
    p.add_argument("--raw", action="store_true", help="write payloads as they are to stdout")

    p = sub.add_parser(
        "bench",
        help="throughput and latency vs message size, msight vs the raw client",
        description="Measure throughput and latency of the configured backend through "
        "PubSubBackend next to its raw client on the same broker.",
    )
    backend_args(p, embedded=True)
    p.add_argument("--sizes", default="1K..16M", help="sizes: 1K,64K,1M or a range 1K..16M")
    p.add_argument(
        "--budget", default="64M", help="bytes sent per size for throughput (default 64M)"
    )
    p.add_argument("--pings", type=int, default=50, help="latency samples per size")
    p.add_argument("--plot", metavar="PNG", help="save a plot of the results")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="also write the results")
    p.add_argument("--no-raw", action="store_true", help="skip the raw client")

    from . import bridge, introspect, play, record, view

    bridge.add_parser(sub, backend_args)
    record.add_parser(sub, backend_args)
    play.add_parser(sub, backend_args)
    view.add_parser(sub, backend_args)
    introspect.add_parsers(sub, backend_args)

    p = sub.add_parser("doctor", help="configuration, connection check and broker limits")
    p.add_argument("--backend", choices=BACKENDS, help="override MSIGHT_PUBSUB_BACKEND")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds for the round trip")
    return parser


class _Formatter(logging.Formatter):
    """Log lines without tracebacks, unless asked for (the CLI promises one-line errors)."""

    def __init__(self, tracebacks: bool) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        if self.tracebacks or not record.exc_info:
            return super().format(record)
        exc = record.exc_info[1]
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            text = super().format(record)
        finally:
            record.exc_info, record.exc_text = saved
        return f"{text} ({type(exc).__name__})" if exc is not None else text


def _setup_logging(verbose: int, tracebacks: bool) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)  # nodes set their own logger levels; filter at the handler
    handler.setFormatter(_Formatter(tracebacks or verbose >= 2))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)


def _run(args: argparse.Namespace) -> int:
    from .common import resolve_target

    out, err = sys.stdout, sys.stderr
    handler = getattr(args, "run", None)
    if handler is not None:  # record, play, view, topics, hz, bw
        return int(handler(args, out, err))
    if args.command == "broker":
        from .tools import broker_kind, run_broker

        return run_broker(broker_kind(args.kind, args.backend), args.port, out, err)
    if args.command == "doctor":
        from .doctor import run_doctor

        return run_doctor(args.backend, args.timeout, out)
    if args.command in ("pub", "sub", "echo"):
        from . import tools

        if args.command == "pub":
            if args.file:
                with open(args.file, "rb") as source:
                    target = resolve_target(args.backend, embedded="never")
                    return tools.run_pub(target, args.topic, source, args.whole, err)
            target = resolve_target(args.backend, embedded="never")
            return tools.run_pub(target, args.topic, sys.stdin.buffer, args.whole, err)
        target = resolve_target(args.backend, embedded="never")
        return tools.run_sub(
            target, args.topic, args.count, args.group, args.timeout, args.out_dir,
            args.raw, out, err,
        )  # fmt: skip
    if args.command == "demo":
        from .demo import DemoOptions, parse_frame, run_demo

        width, height = parse_frame(args.frame)
        opts = DemoOptions(
            duration=args.duration, rate=args.rate, width=width, height=height,
            points=args.points, json_path=args.json_path, metrics_port=args.metrics_port,
        )  # fmt: skip
        target = resolve_target(args.backend, embedded=args.embedded)
        try:
            for note in target.notes:
                print(f"msight: {note}", file=err, flush=True)
            return run_demo(target, opts, out)
        finally:
            target.close()
    if args.command == "bench":
        from .bench import BenchOptions, run_bench
        from .common import parse_size, parse_sizes

        opts = BenchOptions(
            sizes=parse_sizes(args.sizes), budget=parse_size(args.budget), pings=args.pings,
            plot=args.plot, json_path=args.json_path, raw=not args.no_raw,
        )  # fmt: skip
        target = resolve_target(args.backend, embedded=args.embedded)
        try:
            for note in target.notes:
                print(f"msight: {note}", file=err, flush=True)
            return run_bench(target, opts, out, err)
        finally:
            target.close()
    raise AssertionError(f"unhandled command {args.command!r}")  # pragma: no cover


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``msight`` command line; return the process exit code.

    Never lets a traceback out unless ``--traceback`` is given: errors print one
    line on stderr.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.traceback)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("msight: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0  # `msight sub ... | head` closed the pipe: not an error
    except Exception as exc:
        if args.traceback:
            raise
        code = getattr(exc, "code", 1) if isinstance(exc, MsightError) else 1
        print(f"msight: error: {_one_line(exc)}", file=sys.stderr)
        return code if isinstance(code, int) else 1


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, MissingDependencyError):
        return str(exc)
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, (MsightError, OSError)):
        text = f"{type(exc).__name__}: {text} (internal error; rerun with --traceback)"
    elif isinstance(exc, OSError) and not isinstance(exc, MsightError):
        text = f"{exc.strerror or text}" + (f": {exc.filename}" if exc.filename else "")
    return text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
