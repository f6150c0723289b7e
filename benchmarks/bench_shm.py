"""Shared memory vs Redis vs NATS vs a socket pair, on one host, in one run.

A publisher (this process) sends frames of each size to 1 or 3 subscriber
processes, paced at 30 Hz and flat out, through:

* ``shm``       ``ShmPubSub.publish(bytes)`` -> ``bytes`` from ``receive()`` (``listen()``'s path)
* ``shm-view``  ``ShmPubSub.publish(bytes)`` -> ``receive_view()`` (zero-copy read)
* ``shm-loan``  ``ShmPubSub.loan()`` (the producer writes in place) -> ``receive_view()``
* ``iox``       raw iceoryx2, the client under the shm backend: the frame copied
  into a loaned sample, the subscriber copies it into ``bytes`` (``_iox.py``)
* ``iox-loan``  raw iceoryx2, the header written into a loaned sample, read in place
* ``redis``     ``RedisPubSub`` on an embedded server
* ``nats``      ``NATSPubSub`` on an embedded default server (1 MB max_payload, JetStream)
* ``socket``    a loopback TCP socket per subscriber, 4 MiB buffers, length-prefixed
  frames read with ``recv_into`` into one buffer: the ceiling for a copy through the kernel

Latency runs from just before the publish call (for ``shm-loan``: before
``loan()``; the producer's own work of filling the frame is not counted) to
the moment the subscriber holds usable bytes or a view: both clocks are
``CLOCK_MONOTONIC`` of one host. Frames are built (header + body) before the
clock starts. Each subscriber reports what it got; ``lost`` is the most any
one subscriber missed. MB/s and msg/s are per subscriber, from the first send
to its last arrival.

Usage::

    python benchmarks/bench_shm.py                      # everything (about 12 minutes)
    python benchmarks/bench_shm.py --transports shm shm-view shm-loan --sizes 16M \\
        --modes paced --subs 3 --plot shm.png --json shm.json
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import shutil
import socket
import struct
import sys
import threading
import time
import uuid
from array import array
from dataclasses import asdict, dataclass
from typing import Any

import _iox
from msight_core.errors import MsightError
from msight_core.pubsub import get_pubsub

TRANSPORTS = ("shm", "shm-view", "shm-loan", "iox", "iox-loan", "redis", "nats", "socket")
SIZES = {"1K": 1024, "2M": 2 * 1024 * 1024, "16M": 16 * 1024 * 1024}
HEAD = struct.Struct("<qB")  # sequence number, kind
DATA, WARM, END = 0, 1, 2
LEN = struct.Struct("<Q")
RATE = 30.0
FLAT_COUNT = {1024: 400_000, 2 * 1024 * 1024: 1000, 16 * 1024 * 1024: 200}
FLAT_SECONDS = 3.0
IDLE = 5.0


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


# --------------------------------------------------------------------------- subscribers


def _client(transport: str, env: dict[str, str]) -> Any:
    return get_pubsub(env=env)


def _receive_messages(transport: str, case: dict[str, Any]) -> tuple[array, array]:
    seqs, times = array("q"), array("q")
    client = _client(transport, case["env"])
    # listen() (the seed's path) has no timeout: a timer closes the client if the
    # end marker never comes.
    watchdog = threading.Timer(case["deadline"], client.close)
    try:
        client.subscribe(case["topic"])
        case["ready"]()
        watchdog.start()
        unpack, stamp, add_seq, add_time = HEAD.unpack_from, now_ns, seqs.append, times.append
        if transport in ("shm-view", "shm-loan"):
            while True:
                view = client.receive_view(IDLE)
                if view is None:
                    break
                with view:
                    seq, kind = unpack(view.data)
                    t = stamp()
                if kind == END:
                    break
                if kind == DATA:
                    add_seq(seq)
                    add_time(t)
        else:
            for data in client.listen():
                t = stamp()
                seq, kind = unpack(data)
                if kind == END:
                    break
                if kind == DATA:
                    add_seq(seq)
                    add_time(t)
    except MsightError:
        pass  # closed by the watchdog: report what arrived
    finally:
        watchdog.cancel()
        client.close()
    return seqs, times


def _receive_socket(case: dict[str, Any]) -> tuple[array, array]:
    seqs, times = array("q"), array("q")
    sock = socket.create_connection(("127.0.0.1", case["port"]))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    buf = bytearray(case["size"] + 64)
    view = memoryview(buf)
    case["ready"]()
    sock.settimeout(IDLE)

    def read(n: int) -> bool:
        got = 0
        while got < n:
            k = sock.recv_into(view[got:n])
            if not k:
                return False
            got += k
        return True

    try:
        while read(LEN.size):
            (n,) = LEN.unpack_from(buf)
            if not read(n):
                break
            seq, kind = HEAD.unpack_from(buf)
            t = now_ns()
            if kind == END:
                break
            if kind == DATA:
                seqs.append(seq)
                times.append(t)
    except TimeoutError:
        pass  # the publisher went quiet: report what arrived
    finally:
        sock.close()
    return seqs, times


def worker(conn: Any) -> None:
    """A subscriber process: runs cases sent by the parent until told to stop."""
    import logging

    logging.basicConfig(level=logging.ERROR)
    while True:
        case = conn.recv()
        if case is None:
            return
        case["ready"] = lambda: conn.send("ready")
        try:
            if case["transport"] == "socket":
                seqs, times = _receive_socket(case)
            elif case["transport"].startswith("iox"):
                seqs, times = _iox.receive(case, HEAD, (DATA, END), now_ns, IDLE)
            else:
                seqs, times = _receive_messages(case["transport"], case)
            conn.send({"seq": seqs.tobytes(), "t": times.tobytes()})
        except Exception as exc:  # noqa: BLE001 - reported in the table
            conn.send({"error": f"{type(exc).__name__}: {exc}"})


# --------------------------------------------------------------------------- publisher


@dataclass
class Row:
    size: str
    mode: str
    subs: int
    transport: str
    sent: int = 0
    sent_per_s: float | None = None
    delivered: int = 0
    lost: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    msgs_per_s: float | None = None
    mb_per_s: float | None = None
    note: str = ""


class Publisher:
    """One transport's publishing side for one case."""

    def __init__(self, transport: str, env: dict[str, str], topic: str, size: int) -> None:
        self.transport, self.topic, self.size = transport, topic, size
        self.server: socket.socket | None = None
        self.peers: list[socket.socket] = []
        self.client: Any = None
        self.raw: _iox.RawPublisher | None = None
        if transport.startswith("iox"):
            self.raw = _iox.RawPublisher(env["domain"], topic, size)
        elif transport == "socket":
            self.server = socket.create_server(("127.0.0.1", 0))
            self.port = self.server.getsockname()[1]
        else:
            self.client = _client(transport, env)
            if transport.startswith("shm"):
                self.client.reserve(topic, size)  # segment created and pre-faulted

    def accept(self, count: int) -> None:
        if self.server is not None:
            for _ in range(count):
                peer, _ = self.server.accept()
                peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
                self.peers.append(peer)

    def send(self, seq: int, kind: int, body: bytes) -> int:
        """Build, stamp and send one frame; returns the send time (ns)."""
        if self.transport == "shm-loan":
            t = now_ns()
            with self.client.loan(self.topic, self.size) as buf:
                HEAD.pack_into(buf, 0, seq, kind)
            return t
        if self.raw is not None:  # iox-loan writes the header only, as shm-loan does
            head = HEAD.pack(seq, kind)
            return self.raw.send(head if self.transport == "iox-loan" else head + body, now_ns)
        frame = HEAD.pack(seq, kind) + body
        if self.transport == "socket":
            prefix = LEN.pack(len(frame))
            t = now_ns()
            for peer in self.peers:
                peer.sendall(prefix)
                peer.sendall(frame)
            return t
        t = now_ns()
        self.client.publish(self.topic, frame)
        return t

    def flush(self) -> None:
        if self.client is not None:
            self.client.flush()

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
        if self.server is not None:
            self.server.close()
        if self.client is not None:
            self.client.close()
        if self.raw is not None:
            self.raw.close()


def run_case(
    transport: str, size_name: str, mode: str, subs: int, workers: list[Any], envs: dict[str, Any],
    frames: int,
) -> Row:  # fmt: skip
    size = SIZES[size_name]
    row = Row(size_name, mode, subs, transport)
    env = envs.get(transport.split("-")[0], {})
    topic = f"bench.shm.{uuid.uuid4().hex[:10]}"
    body = bytes(size - HEAD.size)
    pub = None
    try:
        pub = Publisher(transport, env, topic, size)
        deadline = (frames / RATE if mode == "paced" else FLAT_SECONDS) + 15.0
        case = {"transport": transport, "env": env, "topic": topic, "size": size,
                "port": getattr(pub, "port", 0), "deadline": deadline}  # fmt: skip
        for conn in workers[:subs]:
            conn.send(case)
        pub.accept(subs)
        for conn in workers[:subs]:
            if not conn.poll(60) or conn.recv() != "ready":
                raise RuntimeError("a subscriber did not get ready")
        for i in range(5):  # warm-up: connections, segments, first-touch faults
            pub.send(-1 - i, WARM, body)
            pub.flush()
            time.sleep(0.05)
        time.sleep(0.2)
        sent = array("q")
        began = time.perf_counter()
        if mode == "paced":
            period = 1e9 / RATE
            start = now_ns() + 50_000_000
            for seq in range(frames):
                target = start + seq * period
                delay = (target - now_ns()) / 1e9
                if delay > 0:
                    time.sleep(delay)
                sent.append(pub.send(seq, DATA, body))
        else:
            count = FLAT_COUNT[size]
            stop = time.monotonic() + FLAT_SECONDS
            for seq in range(count):
                sent.append(pub.send(seq, DATA, body))
                if seq % 64 == 63 and time.monotonic() > stop:
                    break
        pub.flush()
        row.sent_per_s = len(sent) / max(time.perf_counter() - began, 1e-9)
        if transport in ("shm-loan", "iox-loan"):
            row.note = "payload not written: hand-over rate"
        time.sleep(0.3)
        for i in range(1 if transport == "socket" else 3):  # a marker may be lost: repeat
            pub.send(10**12 + i, END, body)
            pub.flush()
            time.sleep(0.05)
        results = []
        for conn in workers[:subs]:
            if not conn.poll(deadline + 60):
                raise RuntimeError("a subscriber did not report")
            results.append(conn.recv())
        _summarize(row, sent, results, size)
    except Exception as exc:  # noqa: BLE001 - one failed case must not end the run
        row.note = f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:100]}"
    finally:
        if pub is not None:
            try:
                pub.close()
            except Exception as exc:  # noqa: BLE001
                row.note = row.note or f"close: {exc}"
    return row


def _summarize(row: Row, sent: array, results: list[dict[str, Any]], size: int) -> None:
    import numpy as np

    row.sent = len(sent)
    sent_ns = np.frombuffer(sent.tobytes(), dtype=np.int64)
    lat: list[Any] = []
    delivered, rates = [], []
    for result in results:
        if "error" in result:
            row.note = result["error"][:100]
            continue
        seqs = np.frombuffer(result["seq"], dtype=np.int64)
        times = np.frombuffer(result["t"], dtype=np.int64)
        ok = (seqs >= 0) & (seqs < len(sent_ns))
        seqs, times = seqs[ok], times[ok]
        delivered.append(len(np.unique(seqs)))
        if len(seqs):
            lat.append((times - sent_ns[seqs]) / 1e6)
            span = (times.max() - sent_ns[0]) / 1e9
            if span > 0:
                rates.append(len(seqs) / span)
    row.delivered = min(delivered) if delivered else 0
    row.lost = row.sent - row.delivered
    if lat:
        all_lat = np.concatenate(lat)
        row.p50_ms = float(np.percentile(all_lat, 50))
        row.p99_ms = float(np.percentile(all_lat, 99))
        row.max_ms = float(all_lat.max())
    if rates:
        row.msgs_per_s = float(np.mean(rates))
        row.mb_per_s = row.msgs_per_s * size / 1e6


# --------------------------------------------------------------------------- output


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def table(rows: list[Row]) -> str:
    head = ["size", "mode", "subs", "transport", "sent", "sent/s", "lost", "p50 ms", "p99 ms",
            "max ms", "msg/s", "MB/s", "note"]  # fmt: skip
    lines = [[r.size, r.mode, str(r.subs), r.transport, str(r.sent), _fmt(r.sent_per_s, 0),
              str(r.lost), _fmt(r.p50_ms), _fmt(r.p99_ms), _fmt(r.max_ms),
              _fmt(r.msgs_per_s, 0), _fmt(r.mb_per_s, 1),
              r.note if r.mode == "flat" or not r.note.startswith("payload") else ""]
             for r in rows]  # fmt: skip
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def goals(rows: list[Row]) -> list[str]:
    def find(transport: str, size: str, mode: str, subs: int) -> Row | None:
        for r in rows:
            if (r.transport, r.size, r.mode, r.subs) == (transport, size, mode, subs):
                return r
        return None

    out = []
    checks = [
        ("shm", "16M", "paced", 3, "p99", 8.0, "publish(bytes) -> bytes, 16 MB, 3 subs, 30 Hz"),
        ("shm-view", "16M", "paced", 3, "p99", 5.0, "publish(bytes) -> views"),
        ("shm-loan", "16M", "paced", 3, "p99", 1.5, "loan -> views"),
        ("shm", "1K", "flat", 1, "rate", 200_000.0, "1 KB to one subscriber, msg/s"),
    ]
    raw = {"shm": "iox", "shm-loan": "iox-loan"}  # the same path on raw iceoryx2
    for transport, size, mode, subs, what, bound, label in checks:
        r = find(transport, size, mode, subs)
        if r is None:
            continue
        if what == "p99":
            ok = r.p99_ms is not None and r.p99_ms <= bound
            base = find(raw.get(transport, ""), size, mode, subs)
            same = f"; raw iceoryx2 in this run: p99 {_fmt(base.p99_ms)} ms" if base else ""
            out.append(
                f"{'PASS' if ok else 'MISS'} {label}: p99 {_fmt(r.p99_ms)} ms (goal <= {bound}){same}"
            )
        else:
            ok = r.msgs_per_s is not None and r.msgs_per_s >= bound
            out.append(
                f"{'PASS' if ok else 'MISS'} {label}: {_fmt(r.msgs_per_s, 0)} (goal >= {bound:,.0f})"
            )
    paced = [r for r in rows if r.transport.startswith("shm") and r.mode == "paced"]
    if paced:
        lost = sum(r.lost for r in paced)
        out.append(f"{'PASS' if lost == 0 else 'MISS'} shm paced runs: {lost} lost (goal 0)")
    return out


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for ax, mode, metric, label in (
        (axes[0], "paced", "p99_ms", "p99 latency at 30 Hz (ms, log)"),
        (axes[1], "flat", "mb_per_s", "flat out, MB/s per subscriber (log)"),
    ):
        groups = sorted({(r.size, r.subs) for r in rows if r.mode == mode},
                        key=lambda g: (SIZES[g[0]], g[1]))  # fmt: skip
        transports = [t for t in TRANSPORTS if any(r.transport == t for r in rows)]
        width = 0.8 / max(len(transports), 1)
        for i, transport in enumerate(transports):
            values = []
            for size, subs in groups:
                match = [r for r in rows if (r.size, r.subs, r.mode, r.transport) ==
                         (size, subs, mode, transport)]  # fmt: skip
                values.append(getattr(match[0], metric) or 0 if match else 0)
            ax.bar([g + i * width for g in range(len(groups))], values, width, label=transport)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
        ax.set_xticklabels([f"{s}\n{n} sub" for s, n in groups])
        ax.set_yscale("log")
        ax.set_title(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def memcpy_ceiling(size: int = SIZES["16M"], rounds: int = 15) -> str:
    """Best time to copy ``size`` bytes between warm buffers, on one core and on two."""
    import ctypes
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    src, dst = np.ones(size, np.uint8), np.zeros(size, np.uint8)
    s, d, half = src.ctypes.data, dst.ctypes.data, size // 2

    def best(copy: Any) -> float:
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            copy()
            times.append(time.perf_counter() - t)
        return min(times) * 1e3

    one = best(lambda: ctypes.memmove(d, s, size))
    with ThreadPoolExecutor(1) as pool:

        def two() -> None:
            future = pool.submit(ctypes.memmove, d + half, s + half, size - half)
            ctypes.memmove(d, s, half)
            future.result()

        both = best(two)
    return f"memcpy {size >> 20} MiB (ceiling): 1 core {one:.2f} ms, 2 cores {both:.2f} ms"


# --------------------------------------------------------------------------- main


def _cleanup(domain: str) -> None:
    for path in glob.glob(f"/dev/shm/{domain}_*") + glob.glob(f"/tmp/iceoryx2/**/{domain}_*"):
        try:
            os.remove(path)
        except OSError:
            pass
    for node_dir in glob.glob("/tmp/iceoryx2/nodes/*/"):
        if not os.listdir(node_dir):
            shutil.rmtree(node_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transports", nargs="+", default=list(TRANSPORTS), choices=TRANSPORTS)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--modes", nargs="+", default=["paced", "flat"], choices=["paced", "flat"])
    parser.add_argument("--subs", nargs="+", type=int, default=[1, 3], choices=[1, 2, 3])
    parser.add_argument("--frames", type=int, default=300,
                        help="frames per paced run (x subscribers = latency samples)")  # fmt: skip
    parser.add_argument("--plot", help="save a PNG plot here")
    parser.add_argument("--json", help="save the rows as JSON here")
    args = parser.parse_args(argv)

    from msight_core.testing.brokers import NatsServer, RedisServer

    domain = f"bench{os.getpid()}"
    envs: dict[str, Any] = {
        "shm": {"MSIGHT_PUBSUB_BACKEND": "shm", "MSIGHT_SHM_DOMAIN": domain},
        "iox": {"domain": domain},
    }
    brokers: list[Any] = []
    if "redis" in args.transports:
        brokers.append(RedisServer().start())
        envs["redis"] = brokers[-1].env()
    if "nats" in args.transports:
        brokers.append(NatsServer().start())
        envs["nats"] = brokers[-1].env()
    ctx = mp.get_context("spawn")
    workers, procs = [], []
    for _ in range(max(args.subs)):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(child,), daemon=True)
        proc.start()
        workers.append(parent)
        procs.append(proc)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    print(memcpy_ceiling(), flush=True)
    rows: list[Row] = []
    try:
        for size in args.sizes:
            for mode in args.modes:
                for subs in args.subs:
                    for transport in args.transports:
                        row = run_case(transport, size, mode, subs, workers, envs, args.frames)
                        rows.append(row)
                        print(f"  {size:>3} {mode:<5} {subs} sub  {transport:<9} "
                              f"sent {row.sent:>7} lost {row.lost:>6} p99 {_fmt(row.p99_ms):>8} ms "
                              f"{_fmt(row.mb_per_s, 1):>8} MB/s {row.note}", flush=True)  # fmt: skip
    except KeyboardInterrupt:
        print("interrupted: reporting what was measured", file=sys.stderr)
    finally:
        for conn in workers:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        for broker in brokers:
            broker.stop()
        _cleanup(domain)
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(memcpy_ceiling())
    print()
    print(table(rows))
    print()
    print("\n".join(goals(rows)))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump([asdict(r) for r in rows], fh, indent=2)
    if args.plot:
        plot(rows, args.plot)
        print(f"plot saved to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
