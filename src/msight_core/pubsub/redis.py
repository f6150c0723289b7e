"""Redis backend: ``RedisPubSub``, the seed's class, over one server or a cluster.

Redis pub/sub has no flow control: a subscriber with 32 MB queued on the server
(or 8 MB for 60 s) is disconnected and its backlog is lost. So a dedicated
reader thread drains the socket continuously, parses replies in bulk with
hiredis and hands messages to a bounded receive queue; the application's pace
only decides what that queue keeps (see ``OverflowPolicy``).

Publishing never waits for a round trip: ``publish()`` appends to an outgoing
buffer and a writer thread sends whatever has accumulated as one batch, in
order, then reads the replies in bulk. While Redis is unreachable the buffer
holds up to ``PublishConfig.buffer_bytes``; beyond that ``publish()`` waits up
to ``PublishConfig.timeout`` and raises :class:`BackpressureError`.

In cluster mode (``MSIGHT_REDIS_MESSAGE_BROKER_USE_CLUSTER=true``, or a
``redis.RedisCluster`` client) the same class speaks sharded pub/sub
(``SPUBLISH``/``SSUBSCRIBE``, Redis 7+ or Valkey 7+), so a channel's traffic
stays on the shard that owns it; older servers are refused with
:class:`~msight_core.errors.ShardedPubSubUnsupportedError` on first use.

Payloads go on the wire unchanged: ``redis-cli SUBSCRIBE`` sees exactly the
published bytes. Delivery is best-effort, as the seeds document: messages
published while a subscriber is disconnected are lost; reconnects are logged
and counted. The publishers and subscribers live in ``_redis/``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import RedisConfig, load_redis_config, parse_redis_node
from ._core import QueueBackend
from ._redis import cluster_publisher, cluster_subscriber, publisher, subscriber
from ._redis.slots import SlotMap
from ._redis.wire import (
    Endpoint,
    cluster_endpoints,
    endpoint_from_client,
    endpoint_from_config,
    is_cluster_client,
)
from .base import Capabilities

__all__ = ["RedisPubSub"]


class RedisPubSub(QueueBackend):
    """Redis pub/sub: broadcast, best-effort, very low latency.

    Args:
        client: a ``redis.Redis`` or ``redis.RedisCluster`` client (the seed's
            ``get_redis_client()``), whose hosts, credentials and TLS settings are
            reused; or a :class:`~msight_core.config.RedisConfig`; or ``None``
            for the ``MSIGHT_REDIS_MESSAGE_BROKER_*`` environment.
        config: queue and publish bounds (defaults from the environment).

    Raises:
        TypeError: ``client`` is neither a redis-py client nor a ``RedisConfig``.
        ConfigError: a cluster node entry is malformed.

    No connection is made until the first ``subscribe()`` or ``publish()``.
    """

    capabilities = Capabilities(
        broadcast=True, groups=False, persistent=False, ordered=True, patterns=True
    )

    def __init__(self, client: Any = None, config: RedisConfig | None = None) -> None:
        if isinstance(client, RedisConfig):
            config, client = client, None
        config = config or load_redis_config()
        super().__init__(config.queue)
        self.config = config
        bound, timeout = config.publish.buffer_bytes, config.publish.timeout
        if is_cluster_client(client) or (client is None and config.use_cluster):
            seeds = cluster_endpoints(client) if client is not None else _seeds(config)
            slots = self._slots = SlotMap(seeds)
            self.cluster = True
            # Sharded pub/sub has no pattern subscriptions (there is no SPSUBSCRIBE).
            self.capabilities = dataclasses.replace(self.capabilities, patterns=False)
            self.endpoint = seeds[0]
            self._publisher: Any = cluster_publisher.Publisher(slots, bound, timeout)
            self._new_subscriber: Any = lambda queue: cluster_subscriber.Subscriber(
                slots, queue, max(seeds[0].connect_timeout, 5.0)
            )
            self._where = "cluster " + ",".join(e.address for e in seeds[:3])
        else:
            if client is None:
                endpoint = endpoint_from_config(config)
            else:
                endpoint = endpoint_from_client(client)
            self.cluster = False
            self.endpoint = endpoint
            self._publisher = publisher.Publisher(endpoint, bound, timeout)
            self._new_subscriber = lambda queue: subscriber.Subscriber(endpoint, queue)
            self._where = endpoint.address
        self._subscriber: Any = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<RedisPubSub {self._where} {state} topics={list(self.topics)}>"

    def _subscribe(self, name: str) -> None:
        if self._subscriber is None:
            self._subscriber = self._new_subscriber(self._queue)
        self._subscriber.subscribe(name)

    def _subscribe_pattern(self, pattern: str) -> None:
        if self._subscriber is None:
            self._subscriber = self._new_subscriber(self._queue)
        self._subscriber.subscribe_pattern(pattern)

    def _publish(self, name: str, data: bytes) -> None:
        self._publisher.publish(name, data)

    def _flush(self, timeout: float | None) -> None:
        self._publisher.flush(timeout)

    def _close(self) -> None:
        try:
            self._publisher.close(self.config.publish.timeout)
        finally:
            if self._subscriber is not None:
                self._subscriber.close()

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out.update(self._publisher.stats())
        if self._subscriber is not None:
            out.update(self._subscriber.stats())
        return out


def _seeds(config: RedisConfig) -> list[Endpoint]:
    """The cluster nodes to ask for the slot map first (``cluster_nodes``, else host:port)."""
    base = endpoint_from_config(config)
    entries = config.cluster_nodes or (f"{config.host}:{config.port}",)
    seeds = []
    for entry in entries:
        host, port = parse_redis_node(entry)
        seeds.append(dataclasses.replace(base, host=host, port=port))
    return seeds
