"""NATS clusters: routing between servers, queue groups, failover, JetStream."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from msight_core.pubsub import NATSPubSub
from msight_core.pubsub.utils import get_nats_config
from msight_core.testing.clusters import NatsCluster

from ._stream import run_stream


@pytest.fixture(scope="module")
def nats_cluster() -> Iterator[NatsCluster]:
    with NatsCluster(size=3, jetstream=False, name="msight-core") as c:
        yield c


def _backend(cluster: NatsCluster, order: list[int], group: str | None = None) -> NATSPubSub:
    return NATSPubSub(get_nats_config(group, env=cluster.env(order)))


def _server_of(cluster: NatsCluster, backend: NATSPubSub) -> int:
    """Index of the server ``backend`` is connected to right now."""
    port = backend._conn.client.connected_url.port
    return [s.port for s in cluster.servers].index(port)


def _drain(*subs: NATSPubSub, expect: int, timeout: float = 10.0) -> dict[int, list[bytes]]:
    got: dict[int, list[bytes]] = {i: [] for i in range(len(subs))}
    deadline = time.monotonic() + timeout
    while sum(map(len, got.values())) < expect and time.monotonic() < deadline:
        for i, sub in enumerate(subs):
            msg = sub.receive(0.05)
            if msg is not None:
                got[i].append(msg.data)
    return got


def test_subscriber_on_one_server_gets_messages_published_on_another(
    nats_cluster: NatsCluster, unique_topic: str
) -> None:
    sub = _backend(nats_cluster, [0])
    pub = _backend(nats_cluster, [1])
    try:
        sub.subscribe(unique_topic)
        time.sleep(0.3)  # interest crosses the route asynchronously
        for i in range(500):
            pub.publish(unique_topic, b"%d" % i)
        pub.flush(5)
        got = _drain(sub, expect=500)[0]
        assert got == [b"%d" % i for i in range(500)]
    finally:
        sub.close()
        pub.close()


def test_queue_group_spans_servers(nats_cluster: NatsCluster, unique_topic: str) -> None:
    members = [_backend(nats_cluster, [0], "workers"), _backend(nats_cluster, [2], "workers")]
    pub = _backend(nats_cluster, [1])
    try:
        for member in members:
            member.subscribe(unique_topic)
        time.sleep(0.3)
        for i in range(1000):
            pub.publish(unique_topic, b"%d" % i)
        pub.flush(5)
        got = _drain(*members, expect=1000)
        everything = got[0] + got[1]
        assert sorted(everything) == sorted(b"%d" % i for i in range(1000))  # each once
        assert got[0] and got[1], "both servers' members should take a share"
    finally:
        for member in members:
            member.close()
        pub.close()


@pytest.mark.slow
def test_client_fails_over_when_its_server_is_killed(unique_topic: str) -> None:
    with NatsCluster(size=3, jetstream=False, name="failover") as cluster:
        sub = _backend(cluster, [0, 1, 2])  # nats-py picks one of the three at random
        sub.subscribe(unique_topic)
        victim = _server_of(cluster, sub)
        others = [i for i in range(3) if i != victim]
        # One group member on the victim (listing only it: it fails over to the
        # servers the cluster advertised), one on a survivor.
        member_a = _backend(cluster, [victim], "grp")
        member_c = _backend(cluster, others, "grp")
        pub = _backend(cluster, [others[0]])
        try:
            for backend in (member_a, member_c):
                backend.subscribe(unique_topic)
            time.sleep(0.3)
            assert _server_of(cluster, member_a) == victim
            assert _server_of(cluster, member_c) != victim

            group_got: Counter[int] = Counter()
            stop = threading.Event()

            def drain_group() -> None:
                while not stop.is_set():
                    for member in (member_a, member_c):
                        msg = member.receive(0.02)
                        if msg is not None:
                            group_got[int(msg.data.split(b":", 1)[0])] += 1

            group_thread = threading.Thread(target=drain_group, daemon=True)
            group_thread.start()
            result = run_stream(pub, sub, unique_topic, cluster.servers[victim].kill, after=5.0)
            time.sleep(1.0)
            stop.set()
            group_thread.join(5)
            print(result.summary("NATS cluster: SIGKILL subscriber's server (plain subscriber)"))
            group_lost = result.sent - len(group_got)
            group_dups = sum(c - 1 for c in group_got.values() if c > 1)
            print(
                f"[cluster] NATS cluster: same kill, queue group of 2 (one member on the killed "
                f"server): sent={result.sent} received={len(group_got)} lost={group_lost} "
                f"duplicates={group_dups}"
            )
            assert result.resumed_after_kill()
            tail = set(range(result.sent - 200, result.sent))
            assert tail <= set(result.received), "delivery did not resume completely"
            assert tail <= set(group_got), "the queue group did not resume completely"
            assert group_dups == 0
            assert result.pause < 5.0
            # Both subscriptions moved to the surviving servers.
            assert _server_of(cluster, sub) != victim
            assert _server_of(cluster, member_a) != victim
        finally:
            for backend in (sub, member_a, member_c, pub):
                backend.close()


async def _stream_leader(url: str, topic: str, replicas: int) -> str:
    """The leader of the stream the library created for ``topic``, once elected."""
    import nats

    nc = await nats.connect(url)
    try:
        jsm = nc.jsm()
        name = await jsm.find_stream_name_by_subject(topic)
        for _ in range(100):  # wait for the group to elect a leader
            info = await jsm.stream_info(name)
            if info.cluster and info.cluster.leader:
                assert info.config.num_replicas == replicas
                return str(info.cluster.leader)
            await asyncio.sleep(0.1)
        raise AssertionError("replicated stream got no leader")
    finally:
        await nc.close()


@pytest.mark.slow
def test_jetstream_on_a_cluster_with_a_replicated_stream(unique_topic: str) -> None:
    with NatsCluster(size=3, jetstream=True, name="jsc") as cluster:
        # The library creates the topic's stream, replicated on all three servers.
        js = {"MSIGHT_NATS_JETSTREAM": "true", "MSIGHT_NATS_STREAM_REPLICAS": "3"}
        creator = NATSPubSub(get_nats_config(None, env={**cluster.env([0, 1, 2]), **js}))
        creator.subscribe(unique_topic)
        creator.close()
        leader = asyncio.run(_stream_leader(cluster.urls[0], unique_topic, 3))
        index = int(leader.rsplit("-n", 1)[1])
        others = [i for i in range(3) if i != index]
        env_sub = {**cluster.env([index, *others]), **js}
        # Publishes the stream cannot take during the election are held and sent
        # again within the publish timeout (longer than an election).
        env_pub = {**cluster.env([others[0]]), **js, "MSIGHT_PUBLISH_TIMEOUT": "30"}
        sub = NATSPubSub(get_nats_config("js-workers", env=env_sub))
        pub = NATSPubSub(get_nats_config(None, env=env_pub))
        try:
            sub.subscribe(unique_topic)
            for i in range(200):
                pub.publish(unique_topic, b"%d:warm" % i)
            pub.flush(10)
            assert len(_drain(sub, expect=200)[0]) == 200
            result = run_stream(
                pub, sub, unique_topic, cluster.servers[index].kill, rate=100, after=15.0,
                publish_errors=(Exception,),
            )  # fmt: skip
            print(
                result.summary(f"NATS JetStream R3 stream: SIGKILL stream leader {leader}")
                + f" refused_by_jetstream={pub.stats().get('publish_failed')}"
            )
            assert result.resumed_after_kill()
            assert result.publish_errors == 0 and pub.stats()["publish_failed"] == 0
            assert result.lost == 0
        finally:
            sub.close()
            pub.close()
