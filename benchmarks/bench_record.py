"""``msight record`` keeping up with 6 MB camera frames, next to the disk itself, in one run.

Usage: ``python benchmarks/bench_record.py [--rate 240] [--seconds 8]
[--backends memory,shm,nats,redis] [--dir DIR] [--record-args=--no-crc]``

Rows, all writing 1920x1080x3 ``ImageData`` frames (6.2 MB serialized) into ``--dir``:

- ``disk: os.write``: the frames written flat out with ``os.write`` (page cache),
  then the same with an ``fsync`` at the end: the ceiling of the disk itself.
- ``McapFileWriter``: the recorder's MCAP writer alone, flat out, no broker.
- one row per backend: a publisher paced at ``--rate`` MB/s for ``--seconds``
  feeds a real recorder through the backend. ``memory`` runs the
  :class:`~msight_core.cli.record.Recorder` in this process (the recorder's own
  ceiling); every other backend runs ``msight record`` as its own process (its
  CPU time is reported) against an embedded broker (NATS with 64 MiB
  ``max_payload``) or shared memory (``shm``).

For each backend: frames published and recorded, drops as the recorder counts
them, frames lost before they reached it (published, neither recorded nor
counted: a best-effort broker dropped them), and the recorded rate (bytes over
the span of their receive times). A
recording keeps up when it holds every published frame with 0 drops at the
published rate. The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from msight_core.cli.mcapfile import McapFileWriter, read_messages
from msight_core.cli.record import Recorder, RecordOptions
from msight_core.data import ImageData
from msight_core.pubsub import get_pubsub

MB = 1e6
MiB = 1024 * 1024
#: "dropped": counted by the recorder; "lost": published, neither recorded nor counted
#: (a best-effort broker dropped them before delivery, e.g. Redis disconnecting a
#: subscriber that fell behind).
HEADERS = ["backend", "published", "recorded", "dropped", "lost", "recorded rate", "recorder CPU"]


def frames(count: int = 4) -> list[bytes]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(count):
        image = rng.integers(0, 255, (1080, 1920, 3), dtype=np.uint8)
        out.append(ImageData(image=image, sensor_name="camera1", frame_id=i).serialize())
    return out


def disk_row(directory: Path, payloads: list[bytes], total: int) -> list[tuple[str, str]]:
    path = directory / "raw.bin"
    n = max(total // len(payloads[0]), 1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    started = time.perf_counter()
    for i in range(n):
        os.write(fd, payloads[i % len(payloads)])
    cached = time.perf_counter() - started
    os.fsync(fd)
    synced = time.perf_counter() - started
    os.close(fd)
    path.unlink()
    size = n * len(payloads[0])
    return [
        ("disk: os.write (page cache)", f"{size / cached / MB:.0f} MB/s"),
        ("disk: os.write + fsync", f"{size / synced / MB:.0f} MB/s"),
    ]


def writer_row(directory: Path, payloads: list[bytes], total: int) -> tuple[str, str]:
    path = directory / "writer.mcap"
    n = max(total // len(payloads[0]), 1)
    started = time.perf_counter()
    cpu = time.process_time()
    writer = McapFileWriter(path)
    writer.add_channel("camera1.frames", "ImageData", "msight", {})
    for i in range(n):
        writer.write("camera1.frames", i, i, payloads[i % len(payloads)])
    writer.close()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    path.unlink()
    size = n * len(payloads[0])
    return ("McapFileWriter alone", f"{size / wall / MB:.0f} MB/s ({cpu / wall:.0%} CPU)")


def publish_paced(env: dict[str, str], topic: str, payloads: list[bytes], rate: float,
                  seconds: float) -> tuple[int, float]:  # fmt: skip
    """Publish frames at ``rate`` MB/s; return (frames, achieved MB/s)."""
    interval = len(payloads[0]) / (rate * MB)
    count = int(seconds / interval)
    with get_pubsub(env=env) as backend:
        started = time.monotonic()
        for i in range(count):
            delay = started + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            backend.publish(topic, payloads[i % len(payloads)])
        backend.flush(60)
        took = time.monotonic() - started
    return count, count * len(payloads[0]) / took / MB


def recorded(path: Path) -> tuple[int, float]:
    """(frames, MB/s over the span of their receive times) of a recording."""
    times, sizes = [], []
    for message in read_messages(path):
        times.append(message.log_time)
        sizes.append(len(message.data))
    if len(times) < 2:
        return len(times), 0.0
    return len(times), sum(sizes[1:]) / ((times[-1] - times[0]) / 1e9) / MB


def memory_row(directory: Path, payloads: list[bytes], rate: float, seconds: float,
               crc: bool) -> list[str]:  # fmt: skip
    from msight_core.pubsub import MemoryPubSub

    path = directory / "memory.mcap"
    backend = MemoryPubSub()
    stop = threading.Event()
    published: list[Any] = []
    recorder = Recorder(backend, ["camera1.frames"], RecordOptions(output=path, crc=crc))

    def feed() -> None:
        interval = len(payloads[0]) / (rate * MB)
        count = int(seconds / interval)
        started = time.monotonic()
        for i in range(count):
            delay = started + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            backend.publish("camera1.frames", payloads[i % len(payloads)])
        published.append((count, count * len(payloads[0]) / (time.monotonic() - started) / MB))
        time.sleep(0.5)
        stop.set()

    result = recorder.run(stop, on_ready=lambda: threading.Thread(target=feed).start())
    backend.close()
    count, pub_rate = published[0]
    got, rec_rate = recorded(path)
    path.unlink()
    return ["memory (in-process Recorder)", f"{count} @ {pub_rate:.0f} MB/s", str(got),
            str(result.dropped), str(count - got - result.dropped), f"{rec_rate:.0f} MB/s",
            "-"]  # fmt: skip


def broker_row(kind: str, directory: Path, payloads: list[bytes], rate: float,
               seconds: float, record_args: list[str]) -> list[str]:  # fmt: skip
    from msight_core.testing.brokers import NatsServer, RedisServer

    env = {k: v for k, v in os.environ.items() if not k.startswith("MSIGHT_")}
    broker: Any = None
    if kind == "nats":
        broker = NatsServer(jetstream=True, max_payload=64 * MiB).start()
    elif kind == "redis":
        broker = RedisServer().start()
    if broker is not None:
        env.update(broker.env())
    env["MSIGHT_PUBSUB_BACKEND"] = kind
    if kind == "shm":  # MSIGHT_SHM_* of this shell apply (MSIGHT_SHM_BUFFER_DEPTH=16 ...)
        env.update((k, v) for k, v in os.environ.items() if k.startswith("MSIGHT_SHM_"))
        env["MSIGHT_SHM_DOMAIN"] = f"bench{os.getpid()}"
        env.setdefault("MSIGHT_SHM_MAX_FRAME_BYTES", str(8 * MiB))
    path = directory / f"{kind}.mcap"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(
        [sys.executable, "-m", "msight_core", "record", "camera1.frames", "-o", str(path),
         "--force", *record_args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stderr.readline()  # type: ignore[union-attr]
        if not line.startswith("recording"):
            raise RuntimeError(f"msight record did not start: {line}{proc.stderr.read()}")  # type: ignore[union-attr]
        started = time.monotonic()
        count, pub_rate = publish_paced(env, "camera1.frames", payloads, rate, seconds)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        wall = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
        if broker is not None:
            broker.close()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    summary = out.strip().splitlines()[-1] if out.strip() else err.strip()
    notes = [line for line in err.splitlines()[1:] if line.strip()]
    if notes:
        print(f"  {kind} recorder said: " + " | ".join(notes)[:400], flush=True)
    dropped = summary.rsplit("dropped ", 1)[-1] if "dropped " in summary else "?"
    got, rec_rate = recorded(path)
    path.unlink()
    lost = str(count - got - int(dropped)) if dropped.isdigit() else "?"
    return [f"{kind} (msight record process)", f"{count} @ {pub_rate:.0f} MB/s", str(got),
            dropped, lost, f"{rec_rate:.0f} MB/s", f"{cpu / wall:.0%}"]  # fmt: skip


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=240.0, help="MB/s to publish")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of publishing")
    parser.add_argument("--backends", default="memory,shm,nats,redis")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--record-args", default="", help="extra msight record options")
    args = parser.parse_args()
    directory = Path(args.dir or tempfile.mkdtemp(prefix="msight-bench-record-"))
    directory.mkdir(parents=True, exist_ok=True)
    payloads = frames()
    print(f"frames of {len(payloads[0]) / MB:.2f} MB into {directory}; "
          f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; {os.cpu_count()} CPUs")  # fmt: skip
    total = int(args.rate * MB * args.seconds)
    for name, value in [*disk_row(directory, payloads, total),
                        writer_row(directory, payloads, total)]:  # fmt: skip
        print(f"{name:<30} {value}")
    rows = []
    for kind in [k.strip() for k in args.backends.split(",") if k.strip()]:
        try:
            if kind == "memory":
                crc = "--no-crc" not in args.record_args.split()
                rows.append(memory_row(directory, payloads, args.rate, args.seconds, crc))
            else:
                rows.append(broker_row(kind, directory, payloads, args.rate, args.seconds,
                                       args.record_args.split()))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a backend that cannot run is a row, not a stop
            rows.append([kind, f"failed: {type(exc).__name__}: {exc}"[:90], "", "", "", "", ""])
        print(table(HEADERS, rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(HEADERS, rows))
    print(f"load average after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    if not args.dir:
        directory.rmdir()


if __name__ == "__main__":
    main()
