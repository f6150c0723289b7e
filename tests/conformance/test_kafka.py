"""The shared conformance suite on a real Kafka-protocol broker (tansu)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from msight_core.pubsub import KafkaPubSub
from msight_core.pubsub.utils import get_kafka_config
from msight_core.testing.conformance import PubSubConformance

# tansu assigns a group's partitions after about half the session timeout.
KAFKA_TEST_ENV = {"MSIGHT_KAFKA_CONSUMER_SESSION_TIMEOUT_MS": "6000"}


class TestKafkaConformance(PubSubConformance):
    timeout = 30.0

    @pytest.fixture
    def make_backend(self, kafka_server: Any) -> Callable[..., KafkaPubSub]:
        env = {**kafka_server.env(), **KAFKA_TEST_ENV}

        def make(group_id: str | None = None) -> KafkaPubSub:
            return KafkaPubSub(get_kafka_config(group_id, env=env))

        return make
