"""``msight bridge`` as a real subprocess: status lines, SIGTERM, exit codes."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from _bridge_support import KAFKA_TEST

from msight_core.bridge import open_backend


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSIGHT_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Proc:
    """``python -m msight_core ARGS`` in the background, its lines collected."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "msight_core", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self.lines: queue.Queue[str] = queue.Queue()
        for pipe, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._pump, args=(pipe, sink), daemon=True).start()

    def _pump(self, pipe: Any, sink: list[str]) -> None:
        for line in pipe:
            sink.append(line)
            self.lines.put(line)

    def wait_line(self, needle: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            if needle in line:
                return line
        pytest.fail(f"no line with {needle!r}: rc={self.proc.poll()} stderr={''.join(self.err)}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.kill()


def test_kafka_to_nats_status_lines_and_sigterm(
    procs: list[Proc], kafka_server: Any, nats_server: Any, unique_topic: str
) -> None:
    sets = [a for k, v in KAFKA_TEST.items() for a in ("--from-set", f"{k}={v}")]
    proc = Proc(
        "bridge", "--from", "kafka", "--from-url", kafka_server.address, *sets,
        "--to", "nats", "--to-url", nats_server.url, "--status-interval", "0.5",
        unique_topic, env=_env(),
    )  # fmt: skip
    procs.append(proc)
    proc.wait_line("Ctrl-C to stop")  # subscribed and assigned
    sub = open_backend("nats", nats_server.url, env={})
    pub = open_backend("kafka", kafka_server.address, {"MSIGHT_KAFKA_ORDERED": "true"}, env={})
    try:
        sub.subscribe(unique_topic)
        sent = [b"m-%d" % i for i in range(40)]
        for data in sent:
            pub.publish(unique_topic, data)
        pub.flush()
        got: list[bytes] = []
        deadline = time.monotonic() + 60
        while len(got) < len(sent) and time.monotonic() < deadline:
            message = sub.receive(0.5)
            if message is not None:
                got.append(message.data)
        assert got == sent
        line = proc.wait_line("forwarded 40 (")
        assert "msg/s" in line and "confirmed 40" in line
    finally:
        sub.close()
        pub.close()
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(30) == 0, "".join(proc.err)
    summary = "".join(proc.out)
    assert "forwarded 40 message(s)" in summary and "confirmed 40" in summary
    assert "msight-bridge-" in summary  # the default name, also the Kafka group


def test_sigint_before_anything_arrives_exits_cleanly(
    procs: list[Proc], nats_server: Any, redis_server: Any, unique_topic: str
) -> None:
    proc = Proc(
        "bridge", "--from", "nats", "--from-url", nats_server.url, "--to", "redis",
        "--to-url", redis_server.address, f"{unique_topic}.>", env=_env(),
    )  # fmt: skip
    procs.append(proc)
    proc.wait_line("Ctrl-C to stop")
    proc.proc.send_signal(signal.SIGINT)
    assert proc.proc.wait(30) == 0
    assert "forwarded 0 message(s)" in "".join(proc.out)


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--from", "memory", "--to", "nats", "t"], 2, "memory backend"),
        (["--from", "shm", "--to", "nats", "cam.>"], 1, "does not support wildcard"),
        (["--from", "nats", "--to", "redis", "--to-url", "x:y", "t"], 1, "not a Redis address"),
        (["--from", "nats", "--to", "nats", "t"], 1, "straight back"),
        (["--from", "nats", "--from-set", "NOPE", "--to", "redis", "t"], 2, "MSIGHT_VAR=VALUE"),
        (["--from", "nats", "--to", "redis", "--remap", "x", "t"], 2, "OLD=NEW"),
        (["--from", "nats", "--to", "rabbit", "t"], 2, "invalid choice"),
    ],
)
def test_bad_arguments_are_one_line_errors(args: list[str], code: int, needle: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "msight_core", "bridge", *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == code, done.stderr
    assert needle in done.stderr
    assert "Traceback" not in done.stderr


def test_sigkilled_bridge_resumes_by_its_name_and_loses_nothing(
    procs: list[Proc], kafka_server: Any, redis_server: Any, unique_topic: str
) -> None:
    sets = [a for k, v in KAFKA_TEST.items() for a in ("--from-set", f"{k}={v}")]
    args = (
        "bridge", "--name", f"b-{unique_topic}", "--from", "kafka", "--from-url",
        kafka_server.address, *sets, "--to", "redis", "--to-url", redis_server.address,
        "--status-interval", "0", unique_topic,
    )  # fmt: skip
    sub = open_backend("redis", redis_server.address, env={})
    pub = open_backend("kafka", kafka_server.address, {"MSIGHT_KAFKA_ORDERED": "true"}, env={})
    got: list[bytes] = []

    def take(count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            message = sub.receive(0.2)
            if message is not None:
                got.append(message.data)

    try:
        sub.subscribe(unique_topic)
        first = Proc(*args, env=_env())
        procs.append(first)
        first.wait_line("Ctrl-C to stop")
        sent = [b"k-%d" % i for i in range(300)]
        for data in sent[:150]:
            pub.publish(unique_topic, data)
        pub.flush()
        take(60, 60)
        first.proc.kill()  # SIGKILL: no confirmation, no commit, no goodbye
        first.proc.wait(10)
        for data in sent[150:]:
            pub.publish(unique_topic, data)
        pub.flush()
        second = Proc(*args, env=_env())
        procs.append(second)
        second.wait_line("Ctrl-C to stop", 90)
        take(len(sent), 90)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:  # duplicates may follow: allowed
            message = sub.receive(0.2)
            if message is not None:
                got.append(message.data)
        assert set(sent) <= set(got), sorted(set(sent) - set(got))[:5]
        assert list(dict.fromkeys(got)) == sent  # first arrivals in order
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(30) == 0
    finally:
        sub.close()
        pub.close()
