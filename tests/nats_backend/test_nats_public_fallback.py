"""The NATS backend on nats-py's public API only (``internals.FORCE_PUBLIC``).

What runs when nats-py's internals differ from what ``_nats/internals.py``
expects: nats-py's own parser and callbacks, ``Client.publish``/``flush``
instead of its send buffer, a JetStream request instead of the server's INFO,
and a first connect bounded by msight. Core and JetStream mode must behave as
on the fast path: order, several topics, large frames, groups.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from msight_core.errors import AuthenticationError, BrokerUnavailableError
from msight_core.pubsub import NATSPubSub
from msight_core.pubsub._nats import internals
from msight_core.pubsub._nats.parser import FastParser
from msight_core.pubsub.utils import get_nats_config
from msight_core.testing.brokers import NatsServer, free_port
from msight_core.testing.conformance import collect

MiB = 1024 * 1024


@pytest.fixture
def public_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(internals, "FORCE_PUBLIC", True)
    monkeypatch.setattr(internals, "_announced", {})


@pytest.fixture(params=["core", "jetstream"])
def make(request: Any, nats_server: NatsServer, public_only: None) -> Iterator[Any]:
    env = dict(nats_server.env())
    if request.param == "jetstream":
        env["MSIGHT_NATS_JETSTREAM"] = "true"
    made: list[NATSPubSub] = []

    def build(group_id: str | None = None) -> NATSPubSub:
        backend = NATSPubSub(get_nats_config(group_id, env=env))
        made.append(backend)
        return backend

    yield build
    for backend in made:
        backend.close()


def _on_public_path(backend: NATSPubSub) -> None:
    nc = backend._conn.client
    assert type(nc._ps) is not FastParser
    assert backend._subscriber._parser is None
    wire = backend._publisher._wire
    assert wire is not None and not wire.buffered and not wire.direct
    assert nc.options["max_reconnect_attempts"] == -1  # set at connect, not changed after


def test_round_trip_in_order(make: Any, unique_topic: str) -> None:
    sub, pub = make(), make()
    sub.subscribe(unique_topic)
    # Small messages, and some from 128 KB (handed over as one piece on the fast path).
    sent = [b"%d" % i for i in range(2000)]
    sent[500:500] = [bytes([i]) * (200 * 1024) for i in range(3)]
    for payload in sent:
        pub.publish(unique_topic, payload)
    pub.flush()
    assert [m.data for m in collect(sub, len(sent), 30)] == sent
    _on_public_path(sub)
    _on_public_path(pub)
    assert pub.stats()["publish_failed"] == 0


def test_several_topics_keep_names_and_order(make: Any, unique_topic: str) -> None:
    topics = [f"{unique_topic}.t{i}" for i in range(5)]
    sub, pub = make(), make()
    for topic in topics:
        sub.subscribe(topic)
    sent = [(topics[i % 5], b"%d" % i) for i in range(500)]
    for topic, payload in sent:
        pub.publish(topic, payload)
    pub.flush()
    got = [(m.topic, m.data) for m in collect(sub, len(sent), 30)]
    # nats-py runs each subscription's callback in its own task: the order holds
    # per topic (the contract), not across topics as on the parser's direct route.
    for topic in topics:
        assert [m for m in got if m[0] == topic] == [m for m in sent if m[0] == topic]
    assert len(got) == len(sent)


def test_large_frame_between_small_messages(make: Any, unique_topic: str) -> None:
    sub, pub = make(), make()
    sub.subscribe(unique_topic)
    big = bytes(range(251)) * (3 * MiB // 251)
    sent = [b"before", big, b"after"]
    for payload in sent:
        pub.publish(unique_topic, payload)
    pub.flush(30)
    assert [m.data for m in collect(sub, len(sent), 30)] == sent
    assert pub.stats()["large_frames_sent"] == 1
    assert sub.stats()["large_frames_received"] == 1


def test_group_splits_messages(make: Any, unique_topic: str) -> None:
    members = [make("workers"), make("workers")]
    for member in members:
        member.subscribe(unique_topic)
    pub = make()
    sent = [b"%d" % i for i in range(400)]
    for payload in sent:
        pub.publish(unique_topic, payload)
    pub.flush()
    got: list[list[bytes]] = [[], []]
    deadline = time.monotonic() + 30
    while sum(map(len, got)) < len(sent) and time.monotonic() < deadline:
        for index, member in enumerate(members):
            message = member.receive(0.05)
            if message is not None:
                got[index].append(message.data)
    assert sorted(got[0] + got[1]) == sorted(sent)  # each message to one member
    assert got[0] and got[1]
    for part in got:  # each member sees its share in publish order
        assert part == sorted(part, key=sent.index)


def test_public_paths_are_logged(
    nats_server: NatsServer, unique_topic: str, public_only: None, caplog: Any
) -> None:
    caplog.set_level(logging.DEBUG, logger="msight_core.pubsub.nats")
    with NATSPubSub(get_nats_config(env=nats_server.env())) as backend:
        backend.publish(unique_topic, b"x")
        backend.flush()
    text = caplog.text
    for feature in ("parser", "send buffer", "server info", "reconnect limit"):
        assert f"NATS {feature}: public nats-py API" in text


def test_first_connect_still_gives_up(public_only: None) -> None:
    """nats-py reconnects forever from the start on this path: msight bounds it."""
    env = {"MSIGHT_NATS_SERVERS": f"nats://127.0.0.1:{free_port()}"}
    backend = NATSPubSub(get_nats_config(env=env))
    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError):
        backend.publish("nowhere", b"x")
    assert time.monotonic() - started < 5
    backend.close()


def test_refused_credentials_on_the_public_path(public_only: None) -> None:
    with NatsServer(jetstream=False, token="right") as server:
        env = {**server.env(), "MSIGHT_NATS_TOKEN": "wrong"}
        backend = NATSPubSub(get_nats_config(env=env))
        started = time.monotonic()
        with pytest.raises(AuthenticationError):
            backend.publish("denied", b"x")
        assert time.monotonic() - started < 5
        backend.close()


def test_block_mode_on_the_public_path(
    nats_server: NatsServer, unique_topic: str, public_only: None
) -> None:
    """Without the fast parser the callback waits for the hand-off's room instead:
    nothing is dropped and the instance keeps publishing meanwhile."""
    env = {
        **nats_server.env(),
        "MSIGHT_QUEUE_OVERFLOW": "block",
        "MSIGHT_QUEUE_MAX_MESSAGES": "5",
    }
    slow = NATSPubSub(get_nats_config(env=env))
    watcher = NATSPubSub(get_nats_config(env=nats_server.env()))
    try:
        slow.subscribe(unique_topic)
        watcher.subscribe(unique_topic + ".out")
        sent = [b"m-%d" % i for i in range(300)]
        for payload in sent:
            slow.publish(unique_topic, payload)
        slow.flush(5)
        for i in range(20):
            slow.publish(unique_topic + ".out", b"out-%d" % i)
        slow.flush(2)
        assert [m.data for m in collect(watcher, 20, 5)] == [b"out-%d" % i for i in range(20)]
        assert [m.data for m in collect(slow, len(sent), 15)] == sent
        assert slow.stats()["dropped"] == {}
    finally:
        slow.close()
        watcher.close()
