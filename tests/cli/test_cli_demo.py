"""``msight demo`` as a subprocess against real brokers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from msight_core.testing.brokers import free_port

SMALL = ["--frame", "640x480", "--points", "20000", "--rate", "10"]


def _check_summary(path: Path, backend: str) -> dict[str, Any]:
    summary = json.loads(path.read_text())
    assert summary["backend"] == backend
    for name in ("camera", "lidar", "detections"):
        topic = summary["topics"][name]
        assert topic["received"] > 0, (name, topic)
        assert topic["msgs_per_s"] > 0, (name, topic)
        assert topic["dropped"] == 0, (name, topic)
        assert topic["received"] == topic["published"], (name, topic)
        assert topic["p50_ms"] is not None and topic["p50_ms"] > 0
    assert summary["topics"]["camera"]["mb_per_s"] > 0
    return summary


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broker_env", ["redis", "nats", "kafka"], indirect=True)
def test_demo_streams_without_drops(cli: Any, broker_env: dict[str, str], tmp_path: Path) -> None:
    backend = broker_env["MSIGHT_PUBSUB_BACKEND"]
    out = tmp_path / "summary.json"
    result = cli.run(
        "demo", "--duration", "3", "--no-embedded", *SMALL, "--json", str(out),
        env=broker_env, timeout=100,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "summary: " in result.stdout
    assert "no message lost" in result.stdout
    assert "camera" in result.stdout and "MB/s" in result.stdout
    _check_summary(out, backend)


@pytest.mark.timeout(90)
def test_demo_starts_an_embedded_broker_when_the_configured_one_is_down(
    cli: Any, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens there
    env = cli.env({"MSIGHT_REDIS_MESSAGE_BROKER_PORT": str(port)})
    out = tmp_path / "summary.json"
    result = cli.run("demo", "--duration", "2", *SMALL, "--json", str(out), env=env, timeout=80)
    assert result.returncode == 0, result.stderr
    assert f"localhost:{port} is unreachable: started an embedded redis broker" in result.stderr
    summary = _check_summary(out, "redis")
    assert summary["embedded"] is True


@pytest.mark.timeout(90)
def test_demo_stops_cleanly_on_ctrl_c(cli: Any, redis_server: Any) -> None:
    env = cli.env(redis_server.env())
    demo = cli.start("demo", "--duration", "120", "--no-embedded", *SMALL, env=env)
    demo.wait_line("camera", timeout=60, stream="out")  # the first table line
    code = demo.interrupt(timeout=40)
    assert code == 0, demo.stderr
    assert "interrupted" in demo.stderr
    assert "summary: " in demo.stdout and "(interrupted)" in demo.stdout
    assert "Traceback" not in demo.stderr


@pytest.mark.timeout(60)
def test_demo_refuses_bad_arguments(cli: Any) -> None:
    env = cli.env({"MSIGHT_PUBSUB_BACKEND": "memory"})
    for args in (["--frame", "big"], ["--duration", "soon"], ["--duration", "-1"]):
        result = cli.run("demo", *args, env=env, timeout=30)
        assert result.returncode != 0, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("msight: error:"), result.stderr


@pytest.mark.timeout(60)
def test_demo_runs_on_the_memory_backend(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    env = cli.env({"MSIGHT_PUBSUB_BACKEND": "memory"})
    result = cli.run("demo", "--duration", "2", *SMALL, "--json", str(out), env=env, timeout=50)
    assert result.returncode == 0, result.stderr
    _check_summary(out, "memory")


@pytest.mark.timeout(60)
def test_demo_node_failure_is_one_error_line_without_traceback(cli: Any) -> None:
    pytest.importorskip("msight_core.pubsub.nats")
    from msight_core.testing.brokers import NatsServer

    # JetStream mode against a server without JetStream: no stream can be created.
    with NatsServer(jetstream=False) as server:
        env = cli.env({**server.env(), "MSIGHT_NATS_JETSTREAM": "true"})
        result = cli.run("demo", "--duration", "5", env=env, timeout=50)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("msight: error: node ") and "BrokerError" in last, last
    assert "refused to create the stream" in last and "JetStream enabled" in last, last
