"""Secrets never show: not in any log record (DEBUG, every logger), repr(), str(),
exception message or chained cause, nor in the CLI's output.

Every credential variable gets its own unique value; connects are run both
succeeding (servers configured with those credentials) and failing (wrong
credentials, unreachable servers), on every backend.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import traceback
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from msight_core.config import load_kafka_config, load_nats_config, load_redis_config
from msight_core.errors import MsightError
from msight_core.pubsub import get_pubsub
from msight_core.testing.brokers import NatsServer, RedisServer, free_port
from msight_core.testing.conformance import collect


def _secret(tag: str) -> str:
    return f"S3cr3t{tag}{uuid.uuid4().hex}"


SECRETS = {
    "MSIGHT_REDIS_MESSAGE_BROKER_PASSWORD": _secret("redis"),
    "MSIGHT_NATS_PASSWORD": _secret("natspw"),
    "MSIGHT_NATS_TOKEN": _secret("natstok"),
    "MSIGHT_NATS_NKEY_SEED": "SUA" + _secret("seed").upper(),
    "MSIGHT_NATS_USER_JWT": "eyJ" + _secret("jwt"),
    "MSIGHT_KAFKA_SASL_PASSWORD": _secret("sasl"),
    "MSIGHT_KAFKA_CONSUMER_SSL_KEY_PASSWORD": _secret("sslkey"),
    "MSIGHT_KAFKA_PRODUCER_SASL_OAUTHBEARER_CLIENT_SECRET": _secret("oauth"),
    "MSIGHT_KAFKA_CLIENT_SSL_KEYSTORE_PASSWORD": _secret("keystore"),
}
WRONG = {name: _secret("wrong") for name in SECRETS}


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


class Exposure:
    """Collects every text a user could see and checks it for secrets."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def add(self, *objects: Any) -> None:
        for obj in objects:
            self.texts += [repr(obj), str(obj)]

    def error(self, exc: BaseException) -> None:
        for link in _chain(exc):
            self.add(link, link.args)
        self.texts.append("".join(traceback.format_exception(exc)))

    def run(self, step: Callable[[], Any]) -> BaseException | None:
        try:
            result = step()
        except MsightError as exc:
            self.error(exc)
            return exc
        self.add(result)
        return None

    def check(self, caplog: pytest.LogCaptureFixture, values: list[str]) -> None:
        handler = logging.Formatter()
        for record in caplog.records:
            self.texts.append(record.getMessage())
            self.texts.append(repr(record.args))
            if record.exc_info:
                self.texts.append(handler.formatException(record.exc_info))
        leaks = [(v[:12], t[:200]) for t in self.texts for v in values if v in t]
        assert not leaks, leaks[:5]


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)  # every logger, including the client libraries'
    return caplog


def test_redis_secrets(debug_logs: pytest.LogCaptureFixture, unique_topic: str) -> None:
    secret = SECRETS["MSIGHT_REDIS_MESSAGE_BROKER_PASSWORD"]
    seen = Exposure()
    with RedisServer(password=secret) as server:
        env = {**server.env(), **SECRETS}
        seen.add(load_redis_config(env))
        good = get_pubsub(env=env)
        good.subscribe(unique_topic)
        with get_pubsub(env=env) as pub:
            pub.publish(unique_topic, b"authed")
        assert [m.data for m in collect(good, 1, 5)] == [b"authed"]
        seen.add(good, good.stats())
        good.close()
        wrong = get_pubsub(env={**env, **{k: WRONG[k] for k in SECRETS}})
        assert seen.run(lambda: wrong.subscribe(unique_topic)) is not None
        assert seen.run(lambda: wrong.publish(unique_topic, b"x") or wrong.flush(2)) is not None
        seen.add(wrong)
        wrong.close()
    gone = {**env, "MSIGHT_REDIS_MESSAGE_BROKER_PORT": str(free_port())}
    unreachable = get_pubsub(env=gone)
    assert seen.run(lambda: unreachable.subscribe(unique_topic)) is not None
    unreachable.close()
    seen.check(debug_logs, [*SECRETS.values(), *WRONG.values()])


def test_nats_secrets(debug_logs: pytest.LogCaptureFixture, unique_topic: str) -> None:
    password = SECRETS["MSIGHT_NATS_PASSWORD"]
    token = SECRETS["MSIGHT_NATS_TOKEN"]
    seen = Exposure()
    plain = {k: v for k, v in SECRETS.items() if "NKEY" not in k and "JWT" not in k}
    with NatsServer(jetstream=False, user="alice", password=password) as server:
        env = {**server.env(), **plain}
        env.pop("MSIGHT_NATS_TOKEN")
        seen.add(load_nats_config(env=env))
        with get_pubsub(env=env) as backend:
            backend.subscribe(unique_topic)
            backend.publish(unique_topic, b"hi")
            assert [m.data for m in collect(backend, 1, 5)] == [b"hi"]
            seen.add(backend, backend.stats())
        wrong = get_pubsub(env={**env, "MSIGHT_NATS_PASSWORD": WRONG["MSIGHT_NATS_PASSWORD"]})
        assert seen.run(lambda: wrong.subscribe(unique_topic)) is not None
        wrong.close()
    with NatsServer(jetstream=False, token=token) as server:
        env = {**server.env(), **plain}
        for key in ("MSIGHT_NATS_USERNAME", "MSIGHT_NATS_PASSWORD"):
            env.pop(key, None)
        with get_pubsub(env=env) as backend:
            backend.subscribe(unique_topic)
            seen.add(backend)
        wrong = get_pubsub(env={**env, "MSIGHT_NATS_TOKEN": WRONG["MSIGHT_NATS_TOKEN"]})
        assert seen.run(lambda: wrong.subscribe(unique_topic)) is not None
        wrong.close()
        # nkey seed and user JWT on top of the token: connect or a typed error.
        nkey_env = {**env, **SECRETS}
        if seen.run(lambda: get_pubsub(env=nkey_env).close()) is None:
            backend = get_pubsub(env=nkey_env)
            seen.run(lambda: backend.subscribe(unique_topic))
            seen.add(backend)
            backend.close()
    seen.check(debug_logs, [*SECRETS.values(), *WRONG.values()])


def test_kafka_secrets(debug_logs: pytest.LogCaptureFixture, unique_topic: str) -> None:
    pytest.importorskip("confluent_kafka")
    seen = Exposure()
    env = {
        **SECRETS,
        "MSIGHT_PUBSUB_BACKEND": "kafka",
        "MSIGHT_KAFKA_SERVERS": f"127.0.0.1:{free_port()}",
        "MSIGHT_KAFKA_SASL_MECHANISM": "PLAIN",
        "MSIGHT_KAFKA_SASL_USERNAME": "user",
        "MSIGHT_KAFKA_CONNECT_TIMEOUT": "1",
        "MSIGHT_PUBLISH_TIMEOUT": "1",
    }
    config = load_kafka_config(env=env)
    seen.add(config, config.producer, config.consumer, config.client)
    backend = get_pubsub(env=env)
    assert seen.run(lambda: backend.subscribe(unique_topic)) is not None
    assert seen.run(lambda: backend.publish(unique_topic, b"x")) is not None
    seen.add(backend, backend.stats())
    seen.run(backend.close)
    seen.check(debug_logs, [*SECRETS.values(), *WRONG.values()])


def test_doctor_output_shows_no_secret(unique_topic: str) -> None:
    secret = SECRETS["MSIGHT_REDIS_MESSAGE_BROKER_PASSWORD"]
    outputs: list[str] = []
    with RedisServer(password=secret) as server:
        for extra in ({}, {"MSIGHT_REDIS_MESSAGE_BROKER_PASSWORD": WRONG[
            "MSIGHT_REDIS_MESSAGE_BROKER_PASSWORD"]}):  # fmt: skip
            env = {**os.environ, **SECRETS, **server.env(), **extra, "MSIGHT_LOG_LEVEL": "DEBUG"}
            proc = subprocess.run(
                [sys.executable, "-m", "msight_core", "doctor", "--timeout", "5"],
                env=env,
                check=False,
                capture_output=True,
                text=True,
                timeout=60,
            )
            outputs.append(proc.stdout + proc.stderr)
        for backend in ("nats", "kafka"):
            env = {**os.environ, **SECRETS, "MSIGHT_PUBSUB_BACKEND": backend,
                   "MSIGHT_NATS_SERVERS": f"nats://127.0.0.1:{free_port()}",
                   "MSIGHT_KAFKA_SERVERS": f"127.0.0.1:{free_port()}"}  # fmt: skip
            proc = subprocess.run(
                [sys.executable, "-m", "msight_core", "doctor", "--timeout", "2"],
                env=env,
                check=False,
                capture_output=True,
                text=True,
                timeout=60,
            )
            outputs.append(proc.stdout + proc.stderr)
    assert "backend: redis" in outputs[0], outputs[0][-2000:]
    text = "\n".join(outputs)
    leaks = [name for name, value in {**SECRETS, **WRONG}.items() if value in text]
    assert not leaks, (leaks, text[-3000:])


# -- credentials written inside server URLs (issue 15, row 5) ---------------------------


URL_SECRET = _secret("url")


def test_credentials_in_server_urls_never_show(caplog: pytest.LogCaptureFixture) -> None:
    """``nats://alice:pw@host``, ``redis://u:pw@host`` and a token URL: masked in reprs,
    in ConfigError messages, and in the Kafka pass-through (``sasl.*``)."""
    from msight_core.config import mask_url
    from msight_core.errors import ConfigError

    nats_env = {
        "MSIGHT_NATS_SERVERS": f"nats://alice:{URL_SECRET}@h1:4222,nats://{URL_SECRET}@h2:4222"
    }
    redis_env_nodes = "MSIGHT_REDIS_MESSAGE_BROKER_CLUSTER_NODES"
    redis_env = {
        "MSIGHT_REDIS_MESSAGE_BROKER_USE_CLUSTER": "true",
        redis_env_nodes: f"redis://u:{URL_SECRET}@a:7000",
    }
    kafka_env = {
        "MSIGHT_KAFKA_CLIENT_SASL_OAUTHBEARER_CONFIG": f"clientId=a clientSecret={URL_SECRET}",
        "MSIGHT_KAFKA_PRODUCER_SSL_KEY_PEM": URL_SECRET,
    }
    shown = [
        repr(load_nats_config(env=nats_env)),
        str(load_nats_config(env=nats_env)),
        repr(load_redis_config(redis_env)),
        repr(load_kafka_config(env=kafka_env)),
        mask_url(f"see rediss://u:{URL_SECRET}@h:1/0 and nats://{URL_SECRET}@x"),
    ]
    assert "alice:***@h1" in shown[0] and "nats://***@h2" in shown[0]
    for bad in (
        {"MSIGHT_NATS_SERVERS": f"['nats://alice:{URL_SECRET}@h1:4222', '']"},
        {"MSIGHT_NATS_SERVERS": f"nats://alice:{URL_SECRET}@h1:4222 nats://x"},
    ):
        with pytest.raises(ConfigError) as info:
            load_nats_config(env=bad)
        shown.append(str(info.value))
    from msight_core.pubsub import RedisPubSub

    bad_node = f"redis://u:{URL_SECRET}@a:notaport"
    with pytest.raises(ConfigError) as info:  # the node list is parsed by the backend
        RedisPubSub(load_redis_config(redis_env | {redis_env_nodes: bad_node}))
    shown.append(str(info.value))
    text = "\n".join(shown)
    assert URL_SECRET not in text, text
    assert URL_SECRET not in caplog.text


def test_doctor_masks_credentials_in_server_urls() -> None:
    env = {
        **os.environ,
        "MSIGHT_PUBSUB_BACKEND": "nats",
        "MSIGHT_NATS_SERVERS": f"nats://alice:{URL_SECRET}@127.0.0.1:{free_port()}",
        "MSIGHT_KAFKA_CLIENT_SASL_OAUTHBEARER_CONFIG": f"clientSecret={URL_SECRET}",
        "MSIGHT_LOG_LEVEL": "DEBUG",
    }
    outputs = []
    for backend in ("nats", "kafka"):
        proc = subprocess.run(
            [sys.executable, "-m", "msight_core", "doctor", "--timeout", "2"],
            env={**env, "MSIGHT_PUBSUB_BACKEND": backend},
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        outputs.append(proc.stdout + proc.stderr)
    text = "\n".join(outputs)
    assert "alice:***@127.0.0.1" in outputs[0], outputs[0][-2000:]
    assert URL_SECRET not in text, text[-3000:]
