"""A camera -> processors -> sink pipeline across processes on real brokers.

A source publishes ~2 MB frames at 30 Hz; processing nodes (two in one group
where the broker has groups, one on Redis) turn them into detections; a sink
records them. Every published frame must arrive exactly once, and SIGTERM must
end every process cleanly with exit code 0.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

NODE = Path(__file__).with_name("pipeline_node.py")
MIN_FRAMES = 60  # two seconds at 30 Hz


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _wait(predicate: Any, timeout: float, what: str, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise AssertionError(f"a node exited early ({dead[0].args[2:4]}) while {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out while {what}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    for log in sorted(tmp_path.glob("*.log")):
        text = log.read_text(errors="replace")
        if "Traceback" in text or "ERROR" in text:
            print(f"--- {log.name} ---\n{text[-3000:]}")


@pytest.mark.parametrize("backend", ["redis", "nats", "kafka"])
def test_pipeline_every_frame_once_and_clean_sigterm(
    backend: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    unique_topic: str,
    procs: list[subprocess.Popen],
) -> None:
    if backend != "redis" and importlib.util.find_spec(f"msight_core.pubsub.{backend}") is None:
        pytest.skip(f"msight_core.pubsub.{backend} does not exist yet")
    server = request.getfixturevalue(f"{backend}_server")
    env = {**os.environ, **server.env(), "PYTHONUNBUFFERED": "1"}
    frames, dets = f"{unique_topic}.frames", f"{unique_topic}.dets"
    n_proc = 1 if backend == "redis" else 2  # Redis pub/sub has no groups

    def start(*args: str) -> subprocess.Popen:
        log = (tmp_path / f"{args[1]}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, str(NODE), *args], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        procs.append(proc)
        return proc

    sink_out = tmp_path / "sink.txt"
    sink = start("sink", "sink", dets, str(sink_out), str(tmp_path / "sink.ready"))
    workers = [
        start("processor", f"det{i}", "detectors", frames, dets, str(tmp_path / f"det{i}.ready"))
        for i in range(n_proc)
    ]
    ready = [tmp_path / "sink.ready", *(tmp_path / f"det{i}.ready" for i in range(n_proc))]
    _wait(lambda: all(p.exists() for p in ready), 60, "waiting for subscriptions", procs)

    source_out = tmp_path / "source.txt"
    source = start("source", "camera", frames, "30", str(source_out))

    def received() -> list[int]:
        return [int(x) for x in _lines(sink_out)[::2]]

    _wait(lambda: len(received()) >= 1, 60, "waiting for the first frame", procs)
    first = time.monotonic()
    _wait(lambda: len(received()) >= MIN_FRAMES, 90, "streaming", procs)
    assert _stop(source) == 0
    elapsed = time.monotonic() - first
    published = [int(x) for x in _lines(source_out)]
    assert published == list(range(1, len(published) + 1))
    # 30 Hz really is about 30 Hz (slack for a loaded 2-core machine)
    assert len(published) >= 0.5 * 30 * elapsed

    _wait(lambda: len(received()) >= len(published), 60, "draining", [sink, *workers])
    for proc in (*workers, sink):
        assert _stop(proc) == 0

    got = received()
    dupes = [k for k, n in Counter(got).items() if n > 1]
    assert not dupes, f"frames delivered twice: {dupes[:10]}"
    assert sorted(got) == sorted(published), "some frames were lost"
    by = Counter(_lines(sink_out)[1::2])
    assert set(by) == {f"det{i}" for i in range(n_proc)}, f"load split: {dict(by)}"
    for name in ("camera", "sink", *(f"det{i}" for i in range(n_proc))):
        log = (tmp_path / f"{name}.log").read_text()
        assert f"node {name} stopping on SIGTERM" in log
        assert "Traceback" not in log
