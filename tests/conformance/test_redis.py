"""The shared conformance suite on a real Redis/Valkey server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from msight_core.config import load_redis_config
from msight_core.pubsub import RedisPubSub
from msight_core.testing.conformance import PubSubConformance
from msight_core.utils import get_redis_client


class TestRedisConformance(PubSubConformance):
    @pytest.fixture
    def make_backend(self, redis_server: Any) -> Callable[..., RedisPubSub]:
        config = load_redis_config(redis_server.env())

        def make(group_id: str | None = None) -> RedisPubSub:
            return RedisPubSub(get_redis_client(config))

        return make
