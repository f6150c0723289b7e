"""``msight doctor`` (secrets never shown) and ``msight bench --plot``."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from msight_core.testing.brokers import NatsServer, RedisServer, free_port


def _secret(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex}"


def _assert_hidden(result: Any, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in result.stdout
        assert secret not in result.stderr


@pytest.mark.timeout(60)
def test_doctor_good_redis_with_password(cli: Any) -> None:
    password = _secret("redispw")
    with RedisServer(password=password) as server:
        env = cli.env(server.env())
        assert env["MSIGHT_REDIS_MESSAGE_BROKER_PASSWORD"] == password
        result = cli.run("doctor", env=env, timeout=40)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verdict: OK" in result.stdout
    assert "round trip: OK" in result.stdout
    assert "password                     *** (set)" in result.stdout
    assert "pubsub output buffer: hard 32 MB" in result.stdout
    _assert_hidden(result, password)


@pytest.mark.timeout(60)
def test_doctor_good_nats_with_token(cli: Any) -> None:
    pytest.importorskip("msight_core.pubsub.nats")
    token = _secret("natstoken")
    with NatsServer(token=token) as server:
        result = cli.run("doctor", env=cli.env(server.env()), timeout=40)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verdict: OK" in result.stdout
    assert "max_payload: 1 MB" in result.stdout
    _assert_hidden(result, token)


@pytest.mark.timeout(60)
def test_doctor_wrong_password_fails_without_showing_it(cli: Any) -> None:
    right, wrong = _secret("right"), _secret("wrong")
    with RedisServer(password=right) as server:
        env = cli.env({**server.env(), "MSIGHT_REDIS_MESSAGE_BROKER_PASSWORD": wrong})
        result = cli.run("doctor", env=env, timeout=40)
    assert result.returncode == 1
    assert "verdict: FAIL" in result.stdout
    assert "AuthenticationError" in result.stdout
    _assert_hidden(result, right, wrong)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["redis", "nats", "kafka"])
def test_doctor_unreachable_broker(cli: Any, kind: str) -> None:
    port = free_port()
    secret = _secret(kind)
    env = cli.env(
        {
            "redis": {
                "MSIGHT_REDIS_MESSAGE_BROKER_HOST": "127.0.0.1",
                "MSIGHT_REDIS_MESSAGE_BROKER_PORT": str(port),
                "MSIGHT_REDIS_MESSAGE_BROKER_PASSWORD": secret,
            },
            "nats": {
                "MSIGHT_PUBSUB_BACKEND": "nats",
                "MSIGHT_NATS_SERVERS": f"['nats://127.0.0.1:{port}']",
                "MSIGHT_NATS_PASSWORD": secret,
                "MSIGHT_NATS_USERNAME": "someone",
            },
            "kafka": {
                "MSIGHT_PUBSUB_BACKEND": "kafka",
                "MSIGHT_KAFKA_SERVERS": f"127.0.0.1:{port}",
                "MSIGHT_KAFKA_SASL_MECHANISM": "PLAIN",
                "MSIGHT_KAFKA_SASL_USERNAME": "someone",
                "MSIGHT_KAFKA_SASL_PASSWORD": secret,
                "MSIGHT_KAFKA_PRODUCER_SSL_KEY_PASSWORD": secret + "x",
            },
        }[kind]
    )
    result = cli.run("doctor", env=env, timeout=40)
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stdout
    assert "verdict: FAIL - no" in result.stdout and "reachable" in result.stdout
    assert "*** (set)" in result.stdout
    assert "Traceback" not in result.stderr
    _assert_hidden(result, secret)


@pytest.mark.timeout(60)
def test_doctor_reports_a_bad_setting(cli: Any) -> None:
    env = cli.env({"MSIGHT_REDIS_MESSAGE_BROKER_PORT": "not-a-port"})
    result = cli.run("doctor", env=env, timeout=30)
    assert result.returncode == 1
    assert "MSIGHT_REDIS_MESSAGE_BROKER_PORT must be an integer" in result.stdout


@pytest.mark.timeout(120)
def test_bench_writes_table_json_and_png(cli: Any, redis_server: Any, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png, data = tmp_path / "bench.png", tmp_path / "bench.json"
    result = cli.run(
        "bench", "--sizes", "1K,64K", "--budget", "2M", "--pings", "5", "--no-embedded",
        "--plot", str(png), "--json", str(data), env=cli.env(redis_server.env()), timeout=110,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "msight redis" in result.stdout and "redis-py" in result.stdout
    assert "4/4" in result.stderr  # progress reached the end
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    points = json.loads(data.read_text())["points"]
    assert {(p["client"], p["size"]) for p in points} == {
        (c, s) for c in ("msight redis", "redis-py") for s in (1024, 65536)
    }
    for p in points:
        assert p["mb_per_s"] > 0 and p["p50_ms"] > 0 and p["p99_ms"] >= p["p50_ms"], p
