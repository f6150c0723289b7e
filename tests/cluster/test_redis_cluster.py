"""Redis Cluster: sharded pub/sub across nodes, the topic registry, failover."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from msight_core.config import load_redis_config
from msight_core.config import parse_redis_node as parse_node
from msight_core.errors import ConfigError
from msight_core.pubsub import RedisPubSub
from msight_core.pubsub._redis.slots import SlotMap, crc16, key_slot
from msight_core.testing.brokers import RedisServer, free_port
from msight_core.testing.clusters import RedisCluster
from msight_core.topics import get_topic, list_topics
from msight_core.utils import get_redis_client

from ._stream import run_stream


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster(masters=3, replicas=0) as c:
        yield c


def _env_via(cluster: RedisCluster, index: int) -> dict[str, str]:
    """Cluster mode with a single seed: the node at ``index``."""
    node = cluster.nodes[index]
    return {**cluster.env(), "MSIGHT_REDIS_MESSAGE_BROKER_CLUSTER_NODES": node.address}


def _collect(sub: RedisPubSub, count: int, timeout: float = 10.0) -> list[tuple[str, bytes]]:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        msg = sub.receive(0.5)
        if msg is not None:
            out.append((msg.topic, msg.data))
    return out


def _names_on_distinct_masters(cluster: RedisCluster, stem: str) -> list[str]:
    by_master: dict[int, str] = {}
    i = 0
    while len(by_master) < cluster.n_masters:
        name = f"{stem}.{i}"
        by_master.setdefault(cluster.master_for(name).port, name)
        i += 1
    return list(by_master.values())


def test_key_slot_matches_the_server(cluster: RedisCluster) -> None:
    assert crc16(b"123456789") == 0x31C3  # the cluster spec's test vector
    node = cluster.nodes[0]
    for key in ["t.cam.front", "a", "", "{user1000}.following", "foo{}{bar}", "foo{{bar}}zap"]:
        assert key_slot(key.encode()) == int(node.cmd("CLUSTER", "KEYSLOT", key)), key
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers")


def test_parse_node_forms() -> None:
    assert parse_node("10.0.0.1:7000") == ("10.0.0.1", 7000)
    assert parse_node("redis://h:7001") == ("h", 7001)
    assert parse_node("[::1]:7002") == ("::1", 7002)
    assert parse_node("onlyhost") == ("onlyhost", 6379)
    with pytest.raises(ConfigError):
        parse_node("h:notaport")
    with pytest.raises(ConfigError):
        parse_node("h:99999")
    # A malformed entry written with credentials does not echo them.
    with pytest.raises(ConfigError) as info:
        parse_node("redis://alice:s3cret@h:notaport")
    assert "s3cret" not in str(info.value)


def test_cluster_mode_is_selected_by_config(cluster: RedisCluster) -> None:
    backend = RedisPubSub(load_redis_config(cluster.env()))
    try:
        assert isinstance(backend, RedisPubSub)
        assert type(backend) is RedisPubSub and backend.cluster
        assert "cluster" in repr(backend)
    finally:
        backend.close()


def test_publish_via_one_node_subscribe_via_another(
    cluster: RedisCluster, unique_topic: str
) -> None:
    names = _names_on_distinct_masters(cluster, unique_topic)
    sub = RedisPubSub(load_redis_config(_env_via(cluster, 0)))
    pub = RedisPubSub(load_redis_config(_env_via(cluster, 2)))
    try:
        for name in names:
            sub.subscribe(name)
        # One connection per master that owns a subscribed channel.
        assert len(sub.stats()["subscribed_on"]) == cluster.n_masters
        for i in range(300):
            for name in names:
                pub.publish(name, b"%d" % i)
        pub.flush(10)
        got = _collect(sub, 300 * len(names))
        assert len(got) == 300 * len(names)
        for name in names:  # in order, per channel
            assert [d for t, d in got if t == name] == [b"%d" % i for i in range(300)]
        assert pub.stats()["published"] == 300 * len(names)
    finally:
        sub.close()
        pub.close()


def test_sharded_traffic_stays_on_the_owning_shard(
    cluster: RedisCluster, unique_topic: str
) -> None:
    owner = cluster.master_for(unique_topic)
    others = [n for n in cluster.nodes if n is not owner]
    before = {n.port: int(n.info("stats")["total_net_input_bytes"]) for n in cluster.nodes}
    sub = RedisPubSub(load_redis_config(cluster.env()))
    pub = RedisPubSub(load_redis_config(cluster.env()))
    try:
        sub.subscribe(unique_topic)
        frame = b"f" * 200_000
        for _ in range(20):
            pub.publish(unique_topic, frame)
        pub.flush(10)
        assert len(_collect(sub, 20)) == 20
    finally:
        sub.close()
        pub.close()
    grown = {
        n.port: int(n.info("stats")["total_net_input_bytes"]) - before[n.port]
        for n in cluster.nodes
    }
    # 4 MB went to the owner; the other shards saw only control traffic.
    assert grown[owner.port] > 4_000_000
    assert all(grown[n.port] < 1_000_000 for n in others), grown


def test_stale_slot_map_is_corrected_by_moved(cluster: RedisCluster, unique_topic: str) -> None:
    names = _names_on_distinct_masters(cluster, unique_topic)
    sub = RedisPubSub(load_redis_config(cluster.env()))
    pub = RedisPubSub(load_redis_config(cluster.env()))
    try:
        for name in names:
            sub.subscribe(name)
        pub.publish(names[0], b"warm-up")
        pub.flush(5)
        # Poison the publisher's map: every slot points at one node.
        slots: SlotMap = pub._slots  # type: ignore[attr-defined]
        wrong = slots.owner(slots.slot(names[0]))
        slots._owners = [wrong] * len(slots._owners)
        for name in names:
            pub.publish(name, b"after")
        pub.flush(5)
        got = _collect(sub, 1 + len(names))
        assert sorted(t for t, d in got if d == b"after") == sorted(names)
        assert pub.stats()["redirected"] >= len(names) - 1
    finally:
        sub.close()
        pub.close()


def test_registry_and_backend_on_a_cluster_client(cluster: RedisCluster, unique_topic: str) -> None:
    client = get_redis_client(env=cluster.env())
    assert type(client).__name__ == "RedisCluster"
    try:
        topic = get_topic(client, unique_topic, register_if_not_exist=True, data_type="ImageData")
        again = get_topic(client, unique_topic)
        assert again.name == topic.name and again.data_type == topic.data_type
        assert unique_topic in list_topics(client)
        backend = RedisPubSub(client)  # the seed's RedisPubSub(get_redis_client())
        try:
            assert type(backend) is RedisPubSub and backend.cluster
            backend.subscribe(topic)
            backend.publish(topic, b"hello")
            msg = backend.receive(5)
            assert msg is not None and msg.data == b"hello"
        finally:
            backend.close()
    finally:
        client.close()


def test_cluster_mode_against_a_plain_server_is_a_clear_error(redis_server: RedisServer) -> None:
    env = {**redis_server.env(), "MSIGHT_REDIS_MESSAGE_BROKER_USE_CLUSTER": "true"}
    backend = RedisPubSub(load_redis_config(env))
    try:
        with pytest.raises(ConfigError, match="not in cluster mode"):
            backend.subscribe("t.plain")
        with pytest.raises(ConfigError, match="not in cluster mode"):
            backend.publish("t.plain", b"x")
    finally:
        backend.close()


@pytest.mark.slow
def test_subscriber_follows_failover_when_its_master_dies(unique_topic: str) -> None:
    with RedisCluster(masters=3, replicas=1, node_timeout_ms=1000) as cluster:
        victim = cluster.master_for(unique_topic)
        seed = next(n for n in cluster.nodes if n is not victim)
        env = {**cluster.env(), "MSIGHT_REDIS_MESSAGE_BROKER_CLUSTER_NODES": seed.address}
        sub = RedisPubSub(load_redis_config(env))
        pub = RedisPubSub(load_redis_config(env))
        try:
            sub.subscribe(unique_topic)
            assert sub.stats()["subscribed_on"] == [victim.address]
            result = run_stream(pub, sub, unique_topic, victim.kill, rate=200, after=8.0)
            print(result.summary(f"Redis Cluster: SIGKILL master {victim.address}"))
            new_owner = cluster.master_for(unique_topic)
            assert new_owner is not victim
            assert sub.stats()["subscribed_on"] == [new_owner.address]
            assert result.resumed_after_kill()
            # The last second of the stream arrived complete: delivery resumed by itself.
            tail = set(range(result.sent - 200, result.sent))
            assert tail <= set(result.received)
            assert result.pause < 8.0
            assert sub.stats()["subscriber_reconnects"] == 1
        finally:
            sub.close()
            pub.close()


def test_a_node_whose_handshake_was_dropped_is_introduced_again() -> None:
    # On a loaded machine a handshake can outlast the node timeout; the server
    # then drops it for good. Here the first introduction of the last node names
    # a bus port nothing listens on, so its handshake is dropped the same way.
    cluster = RedisCluster(masters=3, replicas=0)
    late = cluster.nodes[-1]
    real_bus, met_once = late.bus_port, cluster._met
    calls = []

    def first_meet_misses() -> bool:
        calls.append(time.monotonic())
        if len(calls) == 1:
            late.bus_port = free_port()
        try:
            return met_once()
        finally:
            late.bus_port = real_bus

    cluster._met = first_meet_misses  # type: ignore[method-assign]
    try:
        cluster.start(timeout=15)
        assert all(len(str(n.cmd("CLUSTER", "NODES")).splitlines()) == 3 for n in cluster.nodes)
        assert calls[-1] - calls[0] >= 1.0  # it took a second introduction
    finally:
        cluster.close()
