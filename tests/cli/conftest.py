"""Helpers for the CLI tests: run ``python -m msight_core`` as a real subprocess."""

from __future__ import annotations

import importlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

BACKEND_MODULES = {
    "redis": "msight_core.pubsub.redis",
    "nats": "msight_core.pubsub.nats",
    "kafka": "msight_core.pubsub.kafka",
}


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without any MSIGHT_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSIGHT_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def msight(
    *args: str, env: Mapping[str, str], timeout: float = 60.0, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one ``msight`` command to completion (bounded by ``timeout``)."""
    return subprocess.run(
        [sys.executable, "-m", "msight_core", *args],
        env=dict(env),
        check=False,
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Running:
    """A background ``msight`` process whose output lines can be awaited."""

    def __init__(self, *args: str, env: Mapping[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "msight_core", *args],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._lines: queue.Queue[tuple[str, str]] = queue.Queue()
        for name, pipe, sink in (
            ("out", self.proc.stdout, self.out),
            ("err", self.proc.stderr, self.err),
        ):
            threading.Thread(target=self._pump, args=(name, pipe, sink), daemon=True).start()

    def _pump(self, name: str, pipe: Any, sink: list[str]) -> None:
        for line in pipe:
            sink.append(line)
            self._lines.put((name, line))

    def wait_line(self, needle: str, timeout: float = 60.0, stream: str | None = None) -> str:
        """The first output line containing ``needle``; fails the test on timeout."""
        for name, line in ((("out" if s is self.out else "err"), ln)
                           for s in (self.out, self.err) for ln in list(s)):  # fmt: skip
            if needle in line and stream in (None, name):
                return line
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None and self._lines.empty():
                pytest.fail(
                    f"no line with {needle!r} within {timeout}s; rc={self.proc.poll()}\n"
                    f"stdout: {''.join(self.out)}\nstderr: {''.join(self.err)}"
                )
            try:
                name, line = self._lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if needle in line and stream in (None, name):
                return line

    def interrupt(self, timeout: float = 30.0) -> int:
        """Send SIGINT (Ctrl-C) and wait for the exit code."""
        self.proc.send_signal(signal.SIGINT)
        return self.wait(timeout)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            pytest.fail(f"process did not exit within {timeout}s: {''.join(self.err)}")

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


class Cli:
    """What a test uses: ``env()``, ``run()`` to completion, ``start()`` in background."""

    def __init__(self) -> None:
        self.started: list[Running] = []

    env = staticmethod(clean_env)
    run = staticmethod(msight)

    def start(self, *args: str, env: Mapping[str, str]) -> Running:
        running = Running(*args, env=env)
        self.started.append(running)
        return running


@pytest.fixture
def cli() -> Iterator[Cli]:
    """The CLI runner; background processes are killed at the end of the test."""
    runner = Cli()
    yield runner
    for running in runner.started:
        running.kill()


def require_backend(kind: str) -> None:
    """Skip (with the reason) when the backend module is not importable yet."""
    try:
        importlib.import_module(BACKEND_MODULES[kind])
    except ImportError as exc:
        pytest.skip(f"the {kind} backend module does not import yet: {exc}")


@pytest.fixture
def broker_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """``clean_env()`` pointing at the session broker named by the test's parameter."""
    kind = request.param
    require_backend(kind)
    server = request.getfixturevalue(f"{kind}_server")
    return clean_env(server.env())
