"""The shared conformance suite against every asyncio backend, on real brokers.

One harness per backend, as in ``tests/conformance/``: the same scenarios run
through :class:`~msight_core.testing.aio.SyncOverAsync`, plus the async-only
ones of :class:`~msight_core.testing.aio.AsyncPubSubConformance`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from msight_core.aio import AsyncKafkaPubSub, AsyncMemoryPubSub, AsyncNATSPubSub, AsyncRedisPubSub
from msight_core.config import load_redis_config
from msight_core.pubsub.base import Capabilities
from msight_core.pubsub.memory import MemoryBroker
from msight_core.pubsub.utils import get_kafka_config, get_nats_config
from msight_core.testing.aio import AsyncPubSubConformance
from msight_core.utils import get_redis_client

# tansu assigns a group's partitions after about half the session timeout.
KAFKA_TEST_ENV = {"MSIGHT_KAFKA_CONSUMER_SESSION_TIMEOUT_MS": "6000"}


class TestAsyncMemoryConformance(AsyncPubSubConformance):
    @pytest.fixture
    def make_async_backend(self) -> Callable[..., AsyncMemoryPubSub]:
        broker = MemoryBroker()
        return lambda group_id=None: AsyncMemoryPubSub(group_id=group_id, broker=broker)


class TestAsyncRedisConformance(AsyncPubSubConformance):
    @pytest.fixture
    def make_async_backend(self, redis_server: Any) -> Callable[..., AsyncRedisPubSub]:
        config = load_redis_config(redis_server.env())
        return lambda group_id=None: AsyncRedisPubSub(get_redis_client(config))


class TestAsyncNatsConformance(AsyncPubSubConformance):
    @pytest.fixture
    def make_async_backend(self, nats_server: Any) -> Callable[..., AsyncNATSPubSub]:
        env = nats_server.env()
        return lambda group_id=None: AsyncNATSPubSub(get_nats_config(group_id, env=env))


class TestAsyncNatsJetStreamConformance(AsyncPubSubConformance):
    @pytest.fixture
    def make_async_backend(self, nats_server: Any) -> Callable[..., AsyncNATSPubSub]:
        env = {**nats_server.env(), "MSIGHT_NATS_JETSTREAM": "true"}
        return lambda group_id=None: AsyncNATSPubSub(get_nats_config(group_id, env=env))

    def test_jetstream_mode_is_persistent(self, caps: Capabilities) -> None:
        assert caps.persistent


class TestAsyncKafkaConformance(AsyncPubSubConformance):
    timeout = 30.0

    @pytest.fixture
    def make_async_backend(self, kafka_server: Any) -> Callable[..., AsyncKafkaPubSub]:
        env = {**kafka_server.env(), **KAFKA_TEST_ENV}
        return lambda group_id=None: AsyncKafkaPubSub(get_kafka_config(group_id, env=env))
