"""Environment for each backend kind on the session brokers (reliability tests)."""

from __future__ import annotations

from typing import Any

import pytest

KINDS = ("redis", "nats", "nats-js", "kafka")
KAFKA_TEST_ENV = {"MSIGHT_KAFKA_CONSUMER_SESSION_TIMEOUT_MS": "6000"}


def env_for(request: pytest.FixtureRequest, kind: str, **extra: str) -> dict[str, str]:
    """``MSIGHT_*`` variables selecting ``kind`` on its session broker."""
    server: Any = request.getfixturevalue(f"{kind.split('-')[0]}_server")
    env = dict(server.env())
    if kind == "nats-js":
        env["MSIGHT_NATS_JETSTREAM"] = "true"
    if kind == "kafka":
        env.update(KAFKA_TEST_ENV)
    env.update(extra)
    return env


def env_on(server: Any, kind: str, **extra: str) -> dict[str, str]:
    """The same for a broker the test started itself."""
    env = dict(server.env())
    if kind == "nats-js":
        env["MSIGHT_NATS_JETSTREAM"] = "true"
    if kind == "kafka":
        env.update(KAFKA_TEST_ENV)
    env.update(extra)
    return env
