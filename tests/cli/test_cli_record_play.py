"""``msight record`` and ``msight play`` against real brokers (issue 20, items 1 and 2)."""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from msight_core.cli.mcapfile import McapFileWriter, read_info, read_messages
from msight_core.data import DetectionResult, ImageData, PointCloudData
from msight_core.pubsub import get_pubsub

pytest.importorskip("mcap", reason="the tools extra is not installed")


def _payloads(n: int) -> list[bytes]:
    """Sensor data, text and binary that is not msight Data, all different."""
    out = []
    for i in range(n):
        if i % 3 == 0:
            image = np.full((8, 12, 3), i, np.uint8)
            out.append(ImageData(image=image, sensor_name="cam", capture_timestamp=1e9 + i)
                       .serialize())  # fmt: skip
        elif i % 3 == 1:
            out.append(f"line {i}\n".encode())
        else:
            out.append(bytes([i % 256]) * (i + 1) + b"\x00\xff\r\n")
    return out


def _publish(env: dict[str, str], messages: list[tuple[str, bytes]], gap: float = 0.01) -> None:
    # On Kafka, one publisher's messages to a topic stay in order through one partition.
    with get_pubsub(env={**env, "MSIGHT_KAFKA_ORDERED": "true"}) as backend:
        for topic, data in messages:
            backend.publish(topic, data)
            time.sleep(gap)
        backend.flush()


def _sequence(path: Path) -> list[tuple[str, bytes]]:
    return [(m.topic, bytes(m.data)) for m in read_messages(path)]


def _per_topic(seq: list[tuple[str, bytes]]) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = defaultdict(list)
    for topic, data in seq:
        out[topic].append(data)
    return dict(out)


def _stop(running: Any) -> str:
    """SIGINT the recorder; return its summary line (it must close cleanly)."""
    assert running.interrupt(60) == 0, running.stderr
    line = running.stdout.strip().splitlines()[-1]
    assert line.startswith("recorded ") and line.endswith("dropped 0"), line
    return line


def _wait_for(path: Path, predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("broker_env", ["redis", "nats", "kafka"], indirect=True)
def test_record_play_record_gives_back_the_same_messages(
    cli: Any, broker_env: dict[str, str], unique_topic: str, tmp_path: Path
) -> None:
    a, b = f"{unique_topic}.a", f"{unique_topic}.b"
    first, second = tmp_path / "first.mcap", tmp_path / "second.mcap"
    sent = [(a if i % 2 else b, data) for i, data in enumerate(_payloads(24))]

    rec = cli.start("record", a, b, "-o", str(first), env=broker_env)
    rec.wait_line("recording", timeout=90, stream="err")
    _publish(broker_env, sent)
    time.sleep(1.5)  # let the last ones arrive; what is queued is written on SIGINT
    _stop(rec)
    kafka = broker_env.get("MSIGHT_KAFKA_SERVERS") is not None
    got = _sequence(first)
    # Kafka keeps order per topic (each topic is its own log); Redis and NATS overall.
    assert (_per_topic(got) == _per_topic(sent)) if kafka else (got == sent), (
        f"{len(got)} of {len(sent)}: {got[:3]}"
    )

    info = read_info(first)
    assert info.complete and info.message_count == len(sent)
    assert info.topics == {a: "ImageData", b: ""} or info.topics == {a: "", b: "ImageData"}
    images = [m for m in read_messages(first) if m.data[:4] == b"\x89MSD"]
    # Capture times (1e9 + i s) as publish times; receive times as log times.
    assert images and all(10**18 <= m.publish_time < 10**18 + 30 * 10**9 for m in images)
    assert all(m.log_time > 10**18 + 10**17 for m in images)

    # Played under new names (fresh topics: on the embedded Kafka broker a new
    # subscriber's "latest" can land inside the backlog of an old topic).
    a2, b2 = f"{unique_topic}.a2", f"{unique_topic}.b2"
    rec = cli.start("record", a2, b2, "-o", str(second), env=broker_env)
    rec.wait_line("recording", timeout=90, stream="err")
    played = cli.run(
        "play", str(first), "--remap", f"{a}={a2}", "--remap", f"{b}={b2}", env=broker_env,
        timeout=90,
    )  # fmt: skip
    assert played.returncode == 0, played.stderr
    assert f"played {len(sent)} message(s)" in played.stdout
    time.sleep(1.5)
    _stop(rec)
    again = [({a2: a, b2: b}[t], d) for t, d in _sequence(second)]
    assert (_per_topic(again) == _per_topic(got)) if kafka else (again == got), (
        f"{len(again)} of {len(got)}: {[len(d) for _, d in again]} vs {[len(d) for _, d in got]}"
    )


@pytest.mark.timeout(120)
def test_sigkilled_recording_stays_readable_up_to_its_last_chunk(
    cli: Any, redis_server: Any, unique_topic: str, tmp_path: Path
) -> None:
    from mcap.exceptions import McapError
    from mcap.stream_reader import StreamReader

    env = cli.env(redis_server.env())
    path = tmp_path / "killed.mcap"
    rec = cli.start("record", unique_topic, "-o", str(path), env=env)
    rec.wait_line("recording", timeout=60, stream="err")
    sent = [(unique_topic, data) for data in _payloads(30)]
    _publish(env, sent, gap=0.0)
    # A chunk is written once it is 1 s old: wait until the file holds all of them.
    _wait_for(path, lambda: len(_sequence(path)) == len(sent))
    _publish(env, [(unique_topic, b"in the chunk being built")], gap=0.0)
    time.sleep(0.2)
    rec.proc.send_signal(signal.SIGKILL)
    rec.proc.wait(10)

    assert not read_info(path).complete  # no summary: it was never closed
    assert _sequence(path) == sent
    # The mcap library's own streaming reader reads it up to the torn end.
    seen = []
    with open(path, "rb") as f:
        try:
            for record in StreamReader(f, validate_crcs=True).records:
                if type(record).__name__ == "Message":
                    seen.append(record.data)
        except McapError:
            pass  # the end of the file: no footer
    assert seen[: len(sent)] == [d for _, d in sent]
    played = cli.run("play", str(path), "--rate", "50", env=env, timeout=60)
    assert played.returncode == 0, played.stderr
    assert "was not closed" in played.stderr and f"played {len(sent)}" in played.stdout


@pytest.mark.timeout(120)
def test_duration_split_and_max_size_close_files_cleanly(
    cli: Any, redis_server: Any, unique_topic: str, tmp_path: Path
) -> None:
    env = cli.env(redis_server.env())
    base = tmp_path / "parts.mcap"
    rec = cli.start(
        "record", unique_topic, "-o", str(base), "--split-size", "3K", "--max-size", "10K",
        "--chunk-size", "1K", env=env,
    )  # fmt: skip
    rec.wait_line("recording", timeout=60, stream="err")
    payloads = [bytes([i]) * 1000 for i in range(20)]
    _publish(env, [(unique_topic, p) for p in payloads], gap=0.005)
    assert rec.wait(60) == 0, rec.stderr
    assert "stopped by size limit" in rec.stdout and rec.stdout.rstrip().endswith("dropped 0")
    parts = sorted(tmp_path.glob("parts_*.mcap"))
    assert len(parts) >= 3 and not base.exists()
    assert sum(p.stat().st_size for p in parts) <= 10 * 1024
    got = [m.data for p in parts for m in read_messages(p)]
    assert all(read_info(p).complete for p in parts)
    assert got == payloads[: len(got)] and len(got) >= 5

    timed = tmp_path / "timed.mcap"
    started = time.monotonic()
    result = cli.run("record", unique_topic, "-o", str(timed), "--duration", "1.5", env=env)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 30
    assert "stopped by duration" in result.stdout and read_info(timed).complete
    again = cli.run("record", unique_topic, "-o", str(timed), "--duration", "1", env=env)
    assert again.returncode == 1 and "exists" in again.stderr


@pytest.mark.timeout(120)
def test_play_options_rate_topics_remap_start(
    cli: Any, redis_server: Any, unique_topic: str, tmp_path: Path
) -> None:
    env = cli.env(redis_server.env())
    src, other, dst = f"{unique_topic}.src", f"{unique_topic}.other", f"{unique_topic}.dst"
    path = tmp_path / "made.mcap"
    writer = McapFileWriter(path)
    writer.add_channel(src, "", "application/octet-stream", {})
    writer.add_channel(other, "", "application/octet-stream", {})
    t0 = 1_700_000_000 * 10**9
    for i in range(6):  # src at 0.0, 0.4, ... 2.0 s; other in between
        writer.write(src, t0 + i * 400_000_000, t0, b"src %d" % i)
        writer.write(other, t0 + i * 400_000_000 + 1, t0, b"other %d" % i)
    writer.close()

    sub = cli.start("sub", dst, "-n", "4", "-t", "60", env=env)
    sub.wait_line("subscribed to", timeout=60, stream="err")
    started = time.monotonic()
    played = cli.run(
        "play", str(path), "--rate", "2", "--topics", src, "--remap", f"{src}={dst}",
        "--start", "0.8", env=env,
    )  # fmt: skip
    assert played.returncode == 0, played.stderr
    assert sub.wait(30) == 0, sub.stderr
    assert sub.stdout.splitlines() == ["src 2", "src 3", "src 4", "src 5"]
    # 1.2 s of recording from the start offset, at twice the speed: about 0.6 s.
    assert "played 4 message(s)" in played.stdout
    assert time.monotonic() - started >= 0.6
    bad = cli.run("play", str(path), "--remap", "nonsense", env=env)
    assert bad.returncode == 2 and "OLD=NEW" in bad.stderr
    missing = cli.run("play", str(tmp_path / "nope.mcap"), env=env)
    assert missing.returncode == 1 and "nope.mcap" in missing.stderr


def test_recorder_writes_sensor_types_and_capture_times(tmp_path: Path) -> None:
    """In-process: the memory backend feeds a Recorder (no broker needed)."""
    import threading

    from msight_core.cli.record import Recorder, RecordOptions
    from msight_core.pubsub import MemoryPubSub

    path = tmp_path / "mem.mcap"
    backend = MemoryPubSub()
    cloud = PointCloudData(points=np.zeros((5, 4), np.float32), capture_timestamp=12.5)
    det = DetectionResult(boxes=[[1, 2, 3, 4]], classes=[1], scores=[0.5], capture_timestamp=7.0)
    stop = threading.Event()
    recorder = Recorder(backend, ["m.cloud", "m.det"], RecordOptions(output=path))

    def feed() -> None:
        backend.publish("m.cloud", cloud.serialize())
        backend.publish("m.det", det.serialize())
        time.sleep(0.3)
        stop.set()

    result = recorder.run(stop, on_ready=lambda: threading.Thread(target=feed).start())
    backend.close()
    assert result.messages == 2 and result.dropped == 0
    got = {m.topic: m for m in read_messages(path)}
    assert got["m.cloud"].data_type == "PointCloudData"
    assert got["m.cloud"].publish_time == 12_500_000_000
    assert got["m.det"].publish_time == 7_000_000_000
    assert got["m.det"].log_time > got["m.cloud"].log_time


@pytest.mark.timeout(180)
@pytest.mark.parametrize("broker_env", ["redis", "nats"], indirect=True)
def test_patterns_record_sub_hz_and_play_filter(
    cli: Any, broker_env: dict[str, str], unique_topic: str, tmp_path: Path
) -> None:
    """`camera1.>`-style patterns in record, sub and hz; play --topics takes them too."""
    frames, points, other = (f"{unique_topic}.cam.frames", f"{unique_topic}.lidar.points",
                             f"{unique_topic}x.cam.frames")  # fmt: skip
    path = tmp_path / "patterns.mcap"
    rec = cli.start("record", f"{unique_topic}.>", "-o", str(path), env=broker_env)
    sub = cli.start("sub", f"{unique_topic}.*.frames", "-n", "3", env=broker_env)
    hz = cli.start("hz", f"{unique_topic}.>", "--duration", "8", "--interval", "1",
                   env=broker_env)  # fmt: skip
    for running in (rec, sub, hz):
        running.wait_line("Ctrl-C", timeout=90, stream="err")
    sent = [(frames if i % 2 else points, f"m{i}".encode()) for i in range(12)]
    _publish(broker_env, [(other, b"not covered"), *sent], gap=0.05)
    time.sleep(1.5)
    _stop(rec)
    assert _sequence(path) == sent  # the other prefix is not recorded
    assert sub.wait(30) == 0, sub.stderr
    assert sub.stdout.splitlines() == [f"{frames}: m1", f"{frames}: m3", f"{frames}: m5"]
    assert hz.wait(60) == 0, hz.stderr
    measured = {line.split(":")[0] for line in hz.stdout.splitlines() if line.strip()}
    assert {frames, points} <= measured and other not in measured, hz.stdout

    from msight_core.cli.play import recorded_messages

    only = [m.topic for m in recorded_messages([path], [f"{unique_topic}.*.points"])]
    assert only == [points] * 6
    assert cli.run("sub", "bad.>.x", env=broker_env).returncode != 0
