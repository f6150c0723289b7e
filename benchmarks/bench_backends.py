"""Every backend against its raw client, each on its own embedded broker, in one run.

The same measurement as ``msight bench`` (see :mod:`msight_core.cli.bench`):
for each backend an embedded broker is started (NATS with JetStream and a 64 MB
``max_payload``), then msight's ``PubSubBackend`` and the raw client (redis-py,
nats-py, confluent-kafka) are measured at each size. One table, one JSON file
and one plot for all of them.

Usage::

    python benchmarks/bench_backends.py                         # redis, nats, kafka; 1K..16M
    python benchmarks/bench_backends.py --backends redis nats --sizes 1K,64K,1M \\
        --plot backends.png --json backends.json
"""

from __future__ import annotations

import argparse
import json
import sys

from msight_core.cli.bench import BenchOptions, Point, format_table, measure, plot_results
from msight_core.cli.bench_clients import clients_for
from msight_core.cli.common import fmt_bytes, parse_size, parse_sizes, resolve_target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=["redis", "nats", "kafka"])
    parser.add_argument("--sizes", default="1K..16M")
    parser.add_argument("--budget", default="64M", help="bytes per size for throughput")
    parser.add_argument("--pings", type=int, default=50, help="latency samples per size")
    parser.add_argument("--plot", help="PNG path")
    parser.add_argument("--json", help="JSON path")
    args = parser.parse_args(argv)
    opts = BenchOptions(
        sizes=parse_sizes(args.sizes), budget=parse_size(args.budget), pings=args.pings
    )
    points: list[Point] = []
    for kind in args.backends:
        target = resolve_target(kind, embedded="always")
        try:
            for size in opts.sizes:
                for make in clients_for(kind, target.env, raw=True):
                    point = measure(make, size, opts)
                    points.append(point)
                    print(f"{point.client:>16} {fmt_bytes(size):>6} done", file=sys.stderr)
        finally:
            target.close()
    print(format_table(points))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump([p.__dict__ for p in points], fh, indent=2)
    if args.plot:
        plot_results(points, args.plot, "msight vs raw clients, embedded brokers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
