"""Fixtures shared by the Kafka tests: the session broker's settings and backends
made on it, closed after the test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from msight_core.pubsub import KafkaPubSub
from msight_core.pubsub.utils import get_kafka_config

#: tansu takes longer than librdkafka's default to rebalance a group.
TEST_ENV = {"MSIGHT_KAFKA_CONSUMER_SESSION_TIMEOUT_MS": "6000"}


@pytest.fixture
def env(kafka_server: Any) -> dict[str, str]:
    return {**kafka_server.env(), **TEST_ENV}


@pytest.fixture
def backends(env: dict[str, str]) -> Iterator[Callable[..., KafkaPubSub]]:
    made: list[KafkaPubSub] = []

    def make(group_id: str | None = None, **overrides: Any) -> KafkaPubSub:
        backend = KafkaPubSub(get_kafka_config(group_id, env=env, **overrides))
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()
