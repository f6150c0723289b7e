"""``msight bench``: throughput and latency against message size, msight vs raw client.

For each client and size, on a fresh topic of the same broker:

* **latency**: ``pings`` messages sent one at a time (the next once the previous
  arrived); one-way latency from the send timestamp in the payload header to
  its arrival in the subscriber thread (same process, same clock).
* **throughput**: ``budget`` bytes (4 to 20000 messages) sent as fast as the
  client takes them, with at most ~8 MB in flight (Redis disconnects pub/sub
  subscribers 32 MB behind); rate from the first send to the last arrival.
"""

from __future__ import annotations

import json
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np

from ..errors import MissingDependencyError
from .bench_clients import BenchClient, clients_for
from .common import Target, fmt_bytes, fmt_ms, render_table

__all__ = ["BenchOptions", "Point", "plot_results", "run_bench"]

MiB = 1024 * 1024
_HEADER = struct.Struct(">Qd")  # sequence number, send time (perf_counter)
_IN_FLIGHT = 8 * MiB
_STALL = 10.0


@dataclass
class BenchOptions:
    sizes: list[int] = field(default_factory=lambda: [1024 * 4**i for i in range(8)])
    budget: int = 64 * MiB
    pings: int = 50
    plot: str | None = None
    json_path: str | None = None
    raw: bool = True


@dataclass
class Point:
    """One measurement: a client at one message size."""

    client: str
    size: int
    msgs_per_s: float | None = None
    mb_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    messages: int = 0
    lost: int = 0
    note: str = ""


class _Receiver:
    """Counts arrivals and records the latency of each from its header."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.count = 0
        self.bytes = 0
        self.last = 0.0
        self.latencies: list[float] = []

    def on_message(self, data: bytes) -> None:
        now = time.perf_counter()
        _, sent = _HEADER.unpack_from(data)
        with self.cond:
            self.count += 1
            self.bytes += len(data)
            self.last = now
            self.latencies.append(now - sent)
            self.cond.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.count < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.cond.wait(remaining)
        return True


def _payload(seq: int, filler: bytes) -> bytes:
    return _HEADER.pack(seq, time.perf_counter()) + filler


def measure(make: Callable[[], BenchClient], size: int, opts: BenchOptions) -> Point:
    """Latency and throughput of one client at one size (bounded in time)."""
    client = make()
    point = Point(client.name, size)
    size = max(size, _HEADER.size)
    filler = bytes(size - _HEADER.size)
    recv = _Receiver()
    topic = f"msight.bench.{uuid.uuid4().hex[:10]}"
    try:
        client.open(topic, recv.on_message)
        if client.max_payload is not None and size > client.max_payload:
            point.note = f"above the server's max_payload ({fmt_bytes(client.max_payload)})"
            return point
        seq = 0
        # Warm-up message: the path works and connections are up.
        client.publish(_payload(seq, filler))
        client.flush()
        if not recv.wait_for(1, _STALL):
            point.note = "the first message never arrived"
            return point
        # Latency: one message in flight at a time.
        ping_start = len(recv.latencies)
        for _ in range(opts.pings):
            seq += 1
            client.publish(_payload(seq, filler))
            if not recv.wait_for(seq + 1, _STALL):
                point.note = f"ping {seq} lost"
                return point
        lat = np.asarray(recv.latencies[ping_start:])
        if lat.size:
            point.p50_ms = float(np.percentile(lat, 50)) * 1e3
            point.p99_ms = float(np.percentile(lat, 99)) * 1e3
        # Throughput: flood with a bounded number of bytes in flight.
        count = int(min(max(opts.budget // size, 4), 20_000))
        window = max(1, min(1000, _IN_FLIGHT // size))
        base = seq + 1
        started = time.perf_counter()
        for i in range(count):
            if i - (recv.count - base) >= window and not recv.wait_for(
                base + i - window + 1, _STALL
            ):
                break
            client.publish(_payload(base + i, filler))
        client.flush()
        recv.wait_for(base + count, _STALL)
        got = recv.count - base
        point.messages = got
        point.lost = count - got
        elapsed = recv.last - started
        if got and elapsed > 0:
            point.msgs_per_s = got / elapsed
            point.mb_per_s = got * size / elapsed / 1e6
        if point.lost:
            point.note = f"{point.lost} of {count} lost"
    except MissingDependencyError as exc:
        point.note = f"skipped: {exc}"
    except Exception as exc:  # noqa: BLE001 - one failed point must not end the run
        point.note = f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:120]}"
    finally:
        try:
            client.close()
        except Exception as exc:  # noqa: BLE001 - closing after a failure may fail too
            point.note = point.note or f"close failed: {type(exc).__name__}"
    return point


class _Progress:
    def __init__(self, total: int, err: TextIO) -> None:
        self.total = total
        self.err = err
        self.done = 0
        self.tty = bool(getattr(err, "isatty", lambda: False)())

    def step(self, label: str, final: bool = False) -> None:
        if not (self.tty or final):
            return  # in a log, one line per finished measurement is enough
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        text = f"[{bar}] {self.done}/{self.total} {label}"
        if self.tty:
            self.err.write("\r\x1b[K" + text)
        else:
            self.err.write(text + "\n")
        self.err.flush()

    def finish(self) -> None:
        if self.tty:
            self.err.write("\r\x1b[K")
            self.err.flush()


def run_bench(target: Target, opts: BenchOptions, out: TextIO, err: TextIO) -> int:
    """Measure every client at every size; print the table, write plot/JSON if asked.

    Blocks for the whole run. ``KeyboardInterrupt`` stops it and reports what
    was measured so far.
    """
    opts.pings = max(opts.pings, 1)
    factories = clients_for(target.backend, target.env, opts.raw)
    progress = _Progress(len(factories) * len(opts.sizes), err)
    points: list[Point] = []
    err.write(f"msight bench on {target.description}\n")
    interrupted = False
    try:
        for size in opts.sizes:
            for make in factories:
                progress.step(f"{fmt_bytes(size)} ...")
                point = measure(make, size, opts)
                points.append(point)
                progress.done += 1
                progress.step(f"{point.client} {fmt_bytes(size)} done", final=True)
    except KeyboardInterrupt:
        interrupted = True
    progress.finish()
    if interrupted:
        err.write("interrupted: results so far\n")
    out.write(format_table(points) + "\n")
    out.flush()
    if opts.json_path:
        with open(opts.json_path, "w", encoding="utf-8") as fh:
            json.dump(
                {"backend": target.backend, "broker": target.description,
                 "points": [p.__dict__ for p in points]},
                fh, indent=2,
            )  # fmt: skip
    if opts.plot:
        plot_results(points, opts.plot, f"msight bench on {target.description}")
        err.write(f"plot written to {opts.plot}\n")
    return 0


def format_table(points: list[Point]) -> str:
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    rows = [
        (fmt_bytes(p.size), p.client, num(p.msgs_per_s, ",.0f"), num(p.mb_per_s, ",.1f"),
         "-" if p.p50_ms is None else fmt_ms(p.p50_ms / 1e3),
         "-" if p.p99_ms is None else fmt_ms(p.p99_ms / 1e3), p.note)
        for p in points
    ]  # fmt: skip
    return render_table(["size", "client", "msgs/s", "MB/s", "p50 ms", "p99 ms", "note"], rows)


def plot_results(points: list[Point], path: str, title: str) -> None:
    """Save throughput and latency against size, one line per client, as a PNG.

    Raises:
        MissingDependencyError: matplotlib is not installed (the ``plot`` extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullLocator
    except ImportError:
        raise MissingDependencyError("matplotlib", "plot") from None
    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.8))
    clients = list(dict.fromkeys(p.client for p in points))
    for i, name in enumerate(clients):
        color = f"C{i}"
        mine = sorted((p for p in points if p.client == name), key=lambda p: p.size)
        tp = [(p.size, p.mb_per_s) for p in mine if p.mb_per_s]
        if tp:
            ax_tp.plot(*zip(*tp), marker="o", color=color, label=name)
        p50 = [(p.size, p.p50_ms) for p in mine if p.p50_ms is not None]
        p99 = [(p.size, p.p99_ms) for p in mine if p.p99_ms is not None]
        if p50:
            ax_lat.plot(*zip(*p50), marker="o", color=color, label=f"{name} p50")
        if p99:
            ax_lat.plot(*zip(*p99), linestyle="--", color=color, label=f"{name} p99")
    sizes = sorted({p.size for p in points})
    for ax, label in ((ax_tp, "throughput (MB/s)"), (ax_lat, "one-way latency (ms)")):
        ax.set_xscale("log", base=2)
        if sizes:
            ax.set_xticks(sizes, [fmt_bytes(s) for s in sizes])
            ax.xaxis.set_minor_locator(NullLocator())
        ax.set_yscale("log")
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
