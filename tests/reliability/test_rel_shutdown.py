"""Clean shutdown: close() and SIGTERM deliver what was accepted, commit what was
processed, and return in bounded time even when the broker is gone.

The node-level SIGTERM path (every frame once through a pipeline of node
processes) is covered in tests/nodes/test_pipeline.py; here the same promises
are checked for plain application loops and for many threads at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _rel_env import env_for, env_on
from _rel_results import record

from msight_core.errors import MsightError, PublishError
from msight_core.pubsub import get_pubsub
from msight_core.testing.brokers import KafkaServer, NatsServer, RedisServer
from msight_core.testing.conformance import collect

CHILD = Path(__file__).with_name("_sigterm_child.py")


def _wait_for(path: Path, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early with {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"child not ready within {timeout}s")
        time.sleep(0.05)


def _child(role: str, topic: str, out: Path, env: dict[str, str], *extra: str) -> Any:
    log = out.with_suffix(".log").open("wb")
    return subprocess.Popen(
        [sys.executable, str(CHILD), role, topic, str(out), *extra],
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.parametrize("kind", ["nats", "nats-js", "kafka"])
def test_close_from_threads_delivers_everything_accepted(
    kind: str, request: pytest.FixtureRequest, unique_topic: str
) -> None:
    env = env_for(request, kind)
    sub = get_pubsub(env=env)
    sub.subscribe(unique_topic)
    pub = get_pubsub(env=env)
    per_thread, threads = 1500, 4

    def work(tid: int) -> None:
        for i in range(per_thread):
            pub.publish(unique_topic, b"%d-%d-" % (tid, i) + bytes(200))

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    started = time.monotonic()
    pub.close()  # no flush(): close() must deliver what publish() accepted
    close_s = time.monotonic() - started
    total = per_thread * threads
    got = {m.data for m in collect(sub, total, 60)}
    sub.close()
    figures = {"accepted": total, "received": len(got), "close_s": round(close_s, 3)}
    record("shutdown-close", kind, figures)
    assert len(got) == total, figures


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nats", "nats-js", "kafka"])
def test_sigterm_publisher_delivers_everything_accepted(
    kind: str, request: pytest.FixtureRequest, unique_topic: str, tmp_path: Path
) -> None:
    env = env_for(request, kind)
    sub = get_pubsub(env=env)
    sub.subscribe(unique_topic)
    out = tmp_path / "accepted.txt"
    proc = _child("publisher", unique_topic, out, env)
    try:
        _wait_for(out.with_name(out.name + ".ready"), 60, proc)
        got: set[bytes] = {m.data for m in collect(sub, 300, 30)}
        assert got, "the publisher's messages do not arrive"
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(30) == 0, out.with_suffix(".log").read_text()[-2000:]
        exit_s = time.monotonic() - started
        accepted = int(out.read_text())
        deadline = time.monotonic() + 60
        while len(got) < accepted and time.monotonic() < deadline:
            got |= {m.data for m in collect(sub, accepted - len(got), 2)}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        sub.close()
    figures = {"accepted": accepted, "received": len(got), "exit_after_sigterm_s": round(exit_s, 3)}
    record("shutdown-sigterm-publisher", kind, figures)
    assert got == {b"p-%d" % i for i in range(accepted)}, figures


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nats-js", "kafka"])
def test_sigterm_subscriber_commits_what_it_processed(
    kind: str, request: pytest.FixtureRequest, unique_topic: str, tmp_path: Path
) -> None:
    """A group member stopped by SIGTERM: the next member gets exactly the rest."""
    env = env_for(request, kind, MSIGHT_NATS_ACK_WAIT="30")
    group = "term-" + unique_topic.replace(".", "-")
    out = tmp_path / "processed.txt"
    proc = _child("subscriber", unique_topic, out, env, group)
    pub = get_pubsub(env=env)
    sent = [b"p-%d" % i for i in range(3000)]
    try:
        _wait_for(out.with_name(out.name + ".ready"), 90, proc)
        for payload in sent[:2000]:
            pub.publish(unique_topic, payload)
        pub.flush()
        deadline = time.monotonic() + 60
        while (
            not out.exists() or len(out.read_text().split()) < 500
        ) and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # mid-stream: some processed, some not
        assert proc.wait(30) == 0, out.with_suffix(".log").read_text()[-2000:]
        processed = out.read_text().split()
        for payload in sent[2000:]:
            pub.publish(unique_topic, payload)
        pub.flush()
        second = get_pubsub(group_id=group, env=env)
        second.subscribe(unique_topic)
        rest = [m.data.decode() for m in collect(second, len(sent) - len(processed), 60)]
        extra = collect(second, 10, 2.0)  # nothing processed comes back
        second.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        pub.close()
    names = {p.decode() for p in sent}
    figures = {
        "published": len(sent),
        "processed_before_sigterm": len(processed),
        "redelivered": len(set(processed) & set(rest)) + len(extra),
        "missing": len(names - set(processed) - set(rest)),
    }
    record("shutdown-sigterm-commit", kind, figures)
    assert len(processed) == len(set(processed)), figures
    assert set(processed) | set(rest) == names, ("messages lost", figures)
    assert not set(processed) & set(rest) and not extra, ("processed ones came again", figures)


@pytest.mark.parametrize("kind", ["redis", "nats", "nats-js", "kafka"])
def test_close_is_bounded_when_the_broker_is_gone(kind: str, unique_topic: str) -> None:
    timeout = 2.0
    cls = {"redis": RedisServer, "kafka": KafkaServer}.get(kind)
    server = cls() if cls else NatsServer(jetstream=kind == "nats-js")
    with server:
        env = env_on(
            server,
            kind,
            MSIGHT_PUBLISH_TIMEOUT=str(timeout),
            MSIGHT_KAFKA_CONNECT_TIMEOUT="2",
            MSIGHT_NATS_CONNECT_TIMEOUT="2",
        )
        group = None if kind == "redis" else "gone"
        sub = get_pubsub(group_id=group, env=env)
        sub.subscribe(unique_topic)
        pub = get_pubsub(env=env)
        pub.publish(unique_topic, b"before")
        pub.flush(10)
        assert collect(sub, 1, 30)
        server.kill()
        refused = 0
        for i in range(200):  # accepted into the outage buffer, never delivered
            try:
                pub.publish(unique_topic, b"stuck-%d" % i)
            except MsightError:
                refused += 1
        errors: list[str] = []
        started = time.monotonic()
        for backend in (sub, pub):
            try:
                backend.close()
            except PublishError as exc:  # typed report of what could not be delivered
                errors.append(type(exc).__name__)
        elapsed = time.monotonic() - started
    figures = {"close_both_s": round(elapsed, 3), "bound_s": timeout + 10, "errors": errors}
    record("shutdown-broker-gone", kind, figures)
    # Both closes together: the publish timeout for the flush, plus a few seconds
    # for the consumer to give up its group and the threads to stop.
    assert elapsed <= timeout + 10, figures
