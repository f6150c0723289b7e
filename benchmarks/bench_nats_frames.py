"""Large frames over NATS: msight vs raw nats-py vs a socket pair, in one run.

Frames above a default server's ``max_payload`` (1 MB): 2 MB frames paced at
30 Hz (latency) and 4 MB frames flat out (throughput), from this process to
subscriber processes, through:

* ``msight``       ``NATSPubSub`` on a default nats-server (its large-frame path)
* ``msight-group`` the same, the subscribers in one queue group (each frame to
  one member, which asks the publisher for it)
* ``raw-chunked``  raw nats-py on the same server: each frame cut into 1 MB
  messages by hand and joined into ``bytes`` by the subscriber (what an
  application does on a default server without msight)
* ``raw-big``      raw nats-py on a server with ``max_payload`` 64 MB: the frame
  as one message (what NATS does when the server is reconfigured)
* ``server-raw``   raw sockets on both sides of the default server, no client
  library: the publisher writes the same 1 MB ``PUB`` commands as
  ``raw-chunked``, the subscriber reads with ``recv_into`` and only finds the
  message boundaries (no ``bytes`` made): the ceiling of nats-server itself
  for MB/s and p50 (its p99 is not one: the reader is a plain Python loop)
* ``socket``       a loopback TCP socket per subscriber, 4 MiB buffers,
  length-prefixed frames read with ``recv_into`` into one buffer (no ``bytes``
  made): the ceiling for a copy through the kernel

The ``srv ms`` column is nats-server's CPU time (user + system, from
``/proc``) per frame sent, over the measured part of the run.

Latency runs from just before the publish call to the subscriber holding the
frame (``CLOCK_MONOTONIC`` of one host). MB/s is per subscriber, from the
first send to its last arrival. Rounds are interleaved (machine noise hits
every transport); the table gives the best round and the spread.

Usage::

    python benchmarks/bench_nats_frames.py [--rounds 3] [--subs 1] [--cases 2M-paced 4M-flat]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import struct
import sys
import threading
import time
import uuid
from array import array
from typing import Any

HEAD = struct.Struct("<qB")  # sequence number, kind
PART = struct.Struct("<qII")  # raw-chunked: sequence number, index, count
LEN = struct.Struct("<Q")
DATA, WARM, END = 0, 1, 2
TRANSPORTS = ("msight", "msight-group", "raw-chunked", "raw-big", "server-raw", "socket")
CASES = {"2M-paced": (2 * 1024 * 1024, "paced"), "4M-flat": (4 * 1024 * 1024, "flat")}
RATE = 30.0
PACED_FRAMES = 150
FLAT_FRAMES = 200
FLAT_SECONDS = 3.0
IDLE = 5.0
RAW_CHUNK = 1024 * 1024 - 1024  # under a default server's max_payload, with room for a head


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


# --------------------------------------------------------------------------- subscribers


def _receive_msight(case: dict[str, Any], ready: Any) -> tuple[array, array]:
    from msight_core.pubsub import NATSPubSub
    from msight_core.pubsub.utils import get_nats_config

    seqs, times = array("q"), array("q")
    group = "bench" if case["transport"] == "msight-group" else None
    client = NATSPubSub(get_nats_config(group, env=case["env"]))
    try:
        client.subscribe(case["topic"])
        ready()
        while True:
            message = client.receive(IDLE)
            if message is None:
                break
            t = now_ns()
            seq, kind = HEAD.unpack_from(message.data)
            if kind == END:
                break
            if kind == DATA:
                seqs.append(seq)
                times.append(t)
    finally:
        client.close()
    return seqs, times


def _receive_raw(case: dict[str, Any], ready: Any) -> tuple[array, array]:
    import nats

    seqs, times = array("q"), array("q")
    chunked = case["transport"] == "raw-chunked"

    async def run() -> None:
        done = asyncio.Event()
        parts: list[bytes] = []
        last = [time.monotonic()]

        def frame(data: bytes) -> None:
            t = now_ns()
            last[0] = time.monotonic()
            seq, kind = HEAD.unpack_from(data)
            if kind == END:
                done.set()
            elif kind == DATA:
                seqs.append(seq)
                times.append(t)

        async def on_msg(msg: Any) -> None:
            data = msg.data
            if not chunked:
                return frame(data)
            _, index, count = PART.unpack_from(data)
            if index == 0:
                parts.clear()
            parts.append(data[PART.size :])
            if index + 1 == count and len(parts) == count:
                frame(b"".join(parts))

        nc = await nats.connect(case["url"])
        await nc.subscribe(case["topic"], cb=on_msg, pending_bytes_limit=1 << 30)
        await nc.flush()
        ready()
        while not done.is_set() and time.monotonic() - last[0] < IDLE + 60 * (not seqs):
            try:
                await asyncio.wait_for(done.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
        await nc.close()

    asyncio.run(run())
    return seqs, times


def _receive_server_raw(case: dict[str, Any], ready: Any) -> tuple[array, array]:
    """A raw socket subscribed on the server: walks the MSG lines, keeps nothing."""
    seqs, times = array("q"), array("q")
    host, port = case["url"].removeprefix("nats://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    buf = bytearray(8 * 1024 * 1024)
    view = memoryview(buf)
    start = end = kind = 0
    sock.recv(65536)  # INFO
    sock.sendall(b'CONNECT {"verbose":false}\r\nSUB %s 1\r\nPING\r\n' % case["topic"].encode())
    while b"PONG" not in sock.recv(65536):
        pass
    ready()
    sock.settimeout(IDLE + 30)
    try:
        while True:
            if start == end:
                start = end = 0
            elif end == len(buf) or start > len(buf) // 2:
                view[: end - start] = view[start:end]
                start, end = 0, end - start
            n = sock.recv_into(view[end:])
            if not n:
                break
            end += n
            while True:
                line = buf.find(b"\r\n", start, end)
                if line < 0:
                    break
                if buf[start] != ord("M"):  # PING, +OK
                    if buf.startswith(b"PING", start):
                        sock.sendall(b"PONG\r\n")
                    start = line + 2
                    continue
                size = int(buf[buf.rfind(b" ", start, line) + 1 : line])
                if end - (line + 2) < size + 2:
                    break
                seq, index, count = PART.unpack_from(buf, line + 2)
                if index == 0:  # the frame's own head is at the start of its first chunk
                    kind = buf[line + 2 + PART.size + 8]
                start = line + 2 + size + 2
                if index + 1 == count:
                    t = now_ns()
                    if kind == END:
                        return seqs, times
                    if kind == DATA:
                        seqs.append(seq)
                        times.append(t)
    except TimeoutError:
        pass
    finally:
        sock.close()
    return seqs, times


def _receive_socket(case: dict[str, Any], ready: Any) -> tuple[array, array]:
    seqs, times = array("q"), array("q")
    sock = socket.create_connection(("127.0.0.1", case["port"]))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    buf = bytearray(case["size"] + 64)
    view = memoryview(buf)
    ready()
    sock.settimeout(IDLE + 30)

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
        pass
    finally:
        sock.close()
    return seqs, times


def worker(conn: Any) -> None:
    """A subscriber process: runs cases sent by the parent until told to stop."""
    import logging

    logging.basicConfig(level=logging.ERROR)
    receivers = {
        "msight": _receive_msight,
        "msight-group": _receive_msight,
        "raw-chunked": _receive_raw,
        "raw-big": _receive_raw,
        "server-raw": _receive_server_raw,
    }
    while True:
        case = conn.recv()
        if case is None:
            return
        try:
            receive = receivers.get(case["transport"], None)
            if receive is None:
                seqs, times = _receive_socket(case, lambda: conn.send("ready"))
            else:
                seqs, times = receive(case, lambda: conn.send("ready"))
            conn.send({"seq": seqs.tobytes(), "t": times.tobytes()})
        except Exception as exc:  # noqa: BLE001 - reported in the table
            conn.send({"error": f"{type(exc).__name__}: {exc}"})


# --------------------------------------------------------------------------- publishers


class _Loop:
    """An asyncio loop on a thread, for the raw nats-py publisher."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Publisher:
    def __init__(self, transport: str, case: dict[str, Any]) -> None:
        self.transport, self.topic = transport, case["topic"]
        self.peers: list[socket.socket] = []
        self.server: socket.socket | None = None
        self.nc: Any = None
        self.client: Any = None
        self.aio: _Loop | None = None
        self.raw: socket.socket | None = None
        if transport == "server-raw":
            host, port = case["url"].removeprefix("nats://").rsplit(":", 1)
            self.raw = socket.create_connection((host, int(port)))
            self.raw.recv(65536)  # INFO
            self.raw.sendall(b'CONNECT {"verbose":false}\r\n')
        elif transport == "socket":
            self.server = socket.create_server(("127.0.0.1", 0))
            case["port"] = self.server.getsockname()[1]
        elif transport.startswith("msight"):
            from msight_core.pubsub import NATSPubSub
            from msight_core.pubsub.utils import get_nats_config

            self.client = NATSPubSub(get_nats_config(env=case["env"]))
        else:
            import nats

            self.aio = _Loop()
            self.nc = self.aio.run(nats.connect(case["url"]))

    def accept(self, count: int) -> None:
        if self.server is not None:
            for _ in range(count):
                peer, _ = self.server.accept()
                peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
                self.peers.append(peer)

    async def _raw(self, frame: bytes, seq: int) -> None:
        if self.transport == "raw-big":
            await self.nc.publish(self.topic, frame)
            return
        view = memoryview(frame)
        count = -(-len(frame) // RAW_CHUNK)
        for index in range(count):
            part = view[index * RAW_CHUNK : (index + 1) * RAW_CHUNK]
            await self.nc.publish(self.topic, PART.pack(seq, index, count) + part)

    def send(self, seq: int, kind: int, body: bytes) -> int:
        frame = HEAD.pack(seq, kind) + body
        if self.transport == "socket":
            prefix = LEN.pack(len(frame))
            t = now_ns()
            for peer in self.peers:
                peer.sendall(prefix)
                peer.sendall(frame)
            return t
        t = now_ns()
        if self.raw is not None:
            view, subject = memoryview(frame), self.topic.encode()
            count = -(-len(frame) // RAW_CHUNK)
            for index in range(count):
                part = view[index * RAW_CHUNK : (index + 1) * RAW_CHUNK]
                head = PART.pack(seq, index, count)
                self.raw.sendall(b"PUB %s %d\r\n%s" % (subject, len(head) + len(part), head))
                self.raw.sendall(part)
                self.raw.sendall(b"\r\n")
        elif self.client is not None:
            self.client.publish(self.topic, frame)
        else:
            assert self.aio is not None
            self.aio.run(self._raw(frame, seq))
        return t

    def flush(self) -> None:
        if self.raw is not None:  # a round trip: the server read everything before it
            self.raw.sendall(b"PING\r\n")
            while b"PONG" not in self.raw.recv(65536):
                pass
        elif self.client is not None:
            self.client.flush(60)
        elif self.aio is not None:
            self.aio.run(self.nc.flush(60))

    def close(self) -> None:
        if self.raw is not None:
            self.raw.close()
        for peer in self.peers:
            peer.close()
        if self.server is not None:
            self.server.close()
        if self.client is not None:
            self.client.close()
        if self.aio is not None:
            self.aio.run(self.nc.close())
            self.aio.stop()


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process ``pid`` (0.0 if unknown)."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_case(
    transport: str, name: str, subs: int, workers: list[Any], urls: dict[str, str],
    pids: dict[str, int | None] | None = None,
) -> dict:  # fmt: skip
    size, mode = CASES[name]
    url = urls["big" if transport == "raw-big" else "default"]
    case = {"transport": transport, "topic": f"bench.frames.{uuid.uuid4().hex[:10]}",
            "size": size, "url": url, "env": {"MSIGHT_NATS_SERVERS": f"['{url}']"}}  # fmt: skip
    body = bytes(size - HEAD.size)
    out: dict[str, Any] = {"transport": transport, "case": name, "subs": subs}
    pub = Publisher(transport, case)
    try:
        for conn in workers[:subs]:
            conn.send(case)
        pub.accept(subs)
        for conn in workers[:subs]:
            if not conn.poll(60) or conn.recv() != "ready":
                raise RuntimeError("a subscriber did not get ready")
        for i in range(5):  # warm-up: connections, buffers, first-touch faults
            pub.send(-1 - i, WARM, body)
            pub.flush()
            time.sleep(0.05)
        time.sleep(0.2)
        sent = array("q")
        pid = (pids or {}).get("big" if transport == "raw-big" else "default")
        cpu = _cpu_seconds(pid)
        if mode == "paced":
            start = now_ns() + 50_000_000
            for seq in range(PACED_FRAMES):
                delay = (start + seq * 1e9 / RATE - now_ns()) / 1e9
                if delay > 0:
                    time.sleep(delay)
                sent.append(pub.send(seq, DATA, body))
        else:
            stop = time.monotonic() + FLAT_SECONDS
            for seq in range(FLAT_FRAMES):
                sent.append(pub.send(seq, DATA, body))
                if time.monotonic() > stop:
                    break
        pub.flush()
        if pid is not None and transport != "socket":
            out["srv"] = (_cpu_seconds(pid) - cpu) * 1000 / max(len(sent), 1)
        time.sleep(0.3)
        for i in range(1 if transport == "socket" else 3):  # an end marker may be lost
            pub.send(10**12 + i, END, body)
            pub.flush()
            time.sleep(0.05)
        results = []
        for conn in workers[:subs]:
            if not conn.poll(120):
                raise RuntimeError("a subscriber did not report")
            results.append(conn.recv())
        out.update(_summarize(sent, results, size, grouped=transport == "msight-group"))
    except Exception as exc:  # noqa: BLE001 - one failed case must not end the run
        out["note"] = f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:100]}"
    finally:
        pub.close()
    return out


def _summarize(
    sent: array, results: list[dict[str, Any]], size: int, grouped: bool = False
) -> dict[str, Any]:
    """Latency over every subscriber; ``lost``: what the worst subscriber missed
    (``grouped``: what no member got); MB/s per subscriber (``grouped``: all)."""
    import numpy as np

    sent_ns = np.frombuffer(sent.tobytes(), dtype=np.int64)
    lat, delivered, rates, note, union = [], [], [], "", set()
    for result in results:
        if "error" in result:
            note = result["error"][:100]
            continue
        seqs = np.frombuffer(result["seq"], dtype=np.int64)
        times = np.frombuffer(result["t"], dtype=np.int64)
        ok = (seqs >= 0) & (seqs < len(sent_ns))
        seqs, times = seqs[ok], times[ok]
        delivered.append(len(np.unique(seqs)))
        union.update(seqs.tolist())
        if len(seqs):
            lat.append((times - sent_ns[seqs]) / 1e6)
            span = (times.max() - sent_ns[0]) / 1e9
            rates.append(len(seqs) * size / 1e6 / span if span > 0 else 0.0)
    got = len(union) if grouped else min(delivered, default=0)
    out: dict[str, Any] = {"sent": len(sent), "lost": len(sent) - got}
    if lat:
        all_lat = np.concatenate(lat)
        out.update(p50=float(np.percentile(all_lat, 50)), p99=float(np.percentile(all_lat, 99)),
                   max=float(all_lat.max()))  # fmt: skip
    if rates:
        out["mbps"] = float(np.sum(rates) if grouped else np.mean(rates))
    if note:
        out["note"] = note
    return out


# --------------------------------------------------------------------------- main


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def report(rows: list[dict[str, Any]]) -> str:
    head = f"{'case':<9}{'subs':>5}  {'transport':<12}{'lost':>6}{'p50 ms':>9}{'p99 ms':>9}"
    lines = [head + f"{'max ms':>9}{'MB/s':>8}{'srv ms':>8}   rounds (p99 ms or MB/s)"]
    keys = sorted({(r["case"], r["subs"], r["transport"]) for r in rows},
                  key=lambda k: (k[0], k[1], TRANSPORTS.index(k[2])))  # fmt: skip
    for name, subs, transport in keys:
        runs = [
            r for r in rows if (r["case"], r["subs"], r["transport"]) == (name, subs, transport)
        ]
        flat = CASES[name][1] == "flat"
        metric = "mbps" if flat else "p99"
        ok = [r for r in runs if r.get(metric) is not None]
        if not ok:
            lines.append(f"{name:<9}{subs:>5}  {transport:<12}  {runs[0].get('note', 'no data')}")
            continue
        best = max(ok, key=lambda r: r[metric]) if flat else min(ok, key=lambda r: r[metric])
        spread = ", ".join(_fmt(r.get(metric)) for r in runs)
        lines.append(
            f"{name:<9}{subs:>5}  {transport:<12}{best['lost']:>6}{_fmt(best.get('p50')):>9}"
            f"{_fmt(best.get('p99')):>9}{_fmt(best.get('max')):>9}{_fmt(best.get('mbps')):>8}"
            f"{_fmt(best.get('srv')):>8}"
            f"   {spread}{'  ' + best['note'] if best.get('note') else ''}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transports", nargs="+", default=list(TRANSPORTS), choices=TRANSPORTS)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--subs", nargs="+", type=int, default=[1], choices=[1, 2, 3])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    from msight_core.testing.brokers import NatsServer

    servers = [NatsServer().start(), NatsServer(jetstream=False, max_payload=64 << 20).start()]
    urls = {"default": servers[0].url, "big": servers[1].url}
    pids = {key: getattr(server.process, "pid", None) for key, server in zip(urls, servers)}
    ctx = mp.get_context("spawn")
    workers, procs = [], []
    for _ in range(max(args.subs)):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(child,), daemon=True)
        proc.start()
        workers.append(parent)
        procs.append(proc)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    rows: list[dict[str, Any]] = []
    try:
        for round_ in range(args.rounds):
            for name in args.cases:
                for subs in args.subs:
                    for transport in args.transports:
                        row = run_case(transport, name, subs, workers, urls, pids)
                        rows.append(row)
                        print(f"  round {round_ + 1} {name} {subs} sub {transport:<12} "
                              f"lost {row.get('lost', '-')} p50 {_fmt(row.get('p50'))} "
                              f"p99 {_fmt(row.get('p99'))} ms {_fmt(row.get('mbps'))} MB/s "
                              f"{row.get('note', '')}", flush=True)  # fmt: skip
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
        for server in servers:
            server.stop()
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
