"""Kafka with several bootstrap servers: the first listed one is down."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

pytest.importorskip("confluent_kafka")

from msight_core.pubsub import KafkaPubSub
from msight_core.pubsub.utils import get_kafka_config
from msight_core.testing.brokers import free_port
from msight_core.testing.conformance import collect


def test_starts_and_works_when_the_first_bootstrap_server_is_down(
    kafka_server: Any, unique_topic: str
) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    env = {
        **kafka_server.env(),
        "MSIGHT_KAFKA_SERVERS": f"['{dead}', '{kafka_server.address}']",
        "MSIGHT_KAFKA_CONSUMER_SESSION_TIMEOUT_MS": "6000",
    }
    config = get_kafka_config(f"g-{uuid.uuid4().hex[:8]}", env=env)
    assert config.servers[0] == dead
    sub = KafkaPubSub(config)
    pub = KafkaPubSub(get_kafka_config(env=env))
    try:
        started = time.monotonic()
        sub.subscribe(unique_topic)
        sent = [b"m-%d" % i for i in range(300)]
        for payload in sent:
            pub.publish(unique_topic, payload)
        pub.flush(30)
        got = collect(sub, len(sent), 45)
        elapsed = time.monotonic() - started
        print(
            f"[cluster] Kafka, first bootstrap server down: {len(got)}/{len(sent)} in {elapsed:.1f}s"
        )
        # Order holds per partition only; the topic may have several.
        assert sorted(m.data for m in got) == sorted(sent)
    finally:
        sub.close()
        pub.close()
