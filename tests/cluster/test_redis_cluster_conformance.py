"""The shared conformance suite on a Redis Cluster (sharded pub/sub)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from msight_core.config import load_redis_config
from msight_core.pubsub import RedisPubSub
from msight_core.testing.clusters import RedisCluster
from msight_core.testing.conformance import PubSubConformance


@pytest.fixture(scope="module")
def conformance_cluster() -> Iterator[RedisCluster]:
    with RedisCluster(masters=3, replicas=0) as c:
        yield c


class TestRedisClusterConformance(PubSubConformance):
    @pytest.fixture
    def make_backend(self, conformance_cluster: RedisCluster) -> Callable[..., RedisPubSub]:
        config = load_redis_config(conformance_cluster.env())

        def make(group_id: str | None = None) -> RedisPubSub:
            backend = RedisPubSub(config)
            assert type(backend) is RedisPubSub and backend.cluster
            return backend

        return make
