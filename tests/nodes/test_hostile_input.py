"""A node on a real broker fed by a hostile raw client (issue 15, row 3).

A plain redis-py / nats-py client publishes forged messages on a node's topic: a
wrong-typed ``capture_timestamp``, a buffer referenced thousands of times, bytes
that are no message at all. With ``action_on_error="continue"`` each costs that
message only: the node keeps running and the next valid message is handled.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from msight_core.data import Data, SensorData
from msight_core.data._codec import pack
from msight_core.nodes import NodeConfig, NodeStatus, SinkNode
from msight_core.pubsub import get_pubsub

TIMEOUT = 30.0


class Sink(SinkNode):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ready = threading.Event()
        self.names: list[str | None] = []

    def on_before_spin(self) -> None:
        self.ready.set()

    def on_message(self, data: Data) -> None:
        assert isinstance(data, SensorData)
        self.names.append(data.sensor_name)


def forged() -> list[bytes]:
    return [
        pack("SensorData", {"sensor_name": "evil", "capture_timestamp": "evil"}, []),
        pack(
            "SensorData",
            {"sensor_name": "refs", "metadata": {"x": [{"$b": 0}] * 5000}},
            [memoryview(bytes(50_000))],
        ),
        b"\x89MSD not a message",
        SensorData(sensor_name="good").serialize(),
    ]


def run_sink(env: dict[str, str], topic: str, publish: Any) -> Sink:
    sink = Sink(
        NodeConfig(
            name="sink",
            subscribe_topic_name=topic,
            action_on_error="continue",
            stats_interval=0,
            receive_timeout=0.05,
            register_topics=False,
        ),
        get_pubsub(env=env),
    )
    errors: list[BaseException] = []

    def spin() -> None:
        try:
            sink.spin(handle_signals=False)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        assert sink.ready.wait(TIMEOUT)
        time.sleep(0.3)  # the subscription is live on the server
        publish(forged())
        deadline = time.monotonic() + TIMEOUT
        while "good" not in sink.names:
            assert not errors, errors
            assert time.monotonic() < deadline, "the valid message did not arrive"
            time.sleep(0.02)
        assert sink.status is NodeStatus.RUNNING
        assert sink.stats.snapshot()["errors"] == 3
        assert sink.names == ["good"]
    finally:
        sink.stop()
        thread.join(TIMEOUT)
    assert not errors, errors
    return sink


@pytest.mark.timeout(90)
def test_raw_redis_publisher_costs_one_message_each(redis_server: Any, unique_topic: str) -> None:
    from msight_core.config import load_redis_config
    from msight_core.utils import get_redis_client

    def publish(payloads: list[bytes]) -> None:
        client = get_redis_client(load_redis_config(redis_server.env()), socket_timeout=5)
        try:
            for payload in payloads:
                assert client.publish(unique_topic, payload) == 1
        finally:
            client.close()

    run_sink(redis_server.env(), unique_topic, publish)


@pytest.mark.timeout(90)
def test_raw_nats_publisher_costs_one_message_each(nats_server: Any, unique_topic: str) -> None:
    nats = pytest.importorskip("nats")
    url = nats_server.url

    def publish(payloads: list[bytes]) -> None:
        async def main() -> None:
            nc = await nats.connect(url)
            for payload in payloads:
                await nc.publish(unique_topic, payload)
            await nc.flush()
            await nc.close()

        asyncio.run(main())

    run_sink(nats_server.env(), unique_topic, publish)
