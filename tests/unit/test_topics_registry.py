"""The topic registry on a real Redis server, and topics without a registry."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from msight_core.config import load_redis_config
from msight_core.data import Data, ImageData, PointCloudData, SensorData
from msight_core.errors import (
    BrokerUnavailableError,
    ConfigError,
    InvalidTopicError,
    TopicNotFoundError,
)
from msight_core.testing.brokers import free_port
from msight_core.topics import (
    REDIS_TOPICS_KEY,
    Topic,
    get_topic,
    list_topics,
    validate_topic_name,
)
from msight_core.utils import get_redis_client


@dataclass
class RegistryReading(Data, tag="acme.registry_reading"):
    value: int = 0


@pytest.fixture
def client(redis_server: Any) -> Iterator[Any]:
    c = get_redis_client(load_redis_config(redis_server.env()), socket_timeout=5)
    yield c
    c.close()


def test_topic_without_registry() -> None:
    topic = Topic("camera1.frames", data_type=ImageData, description="frames")
    assert topic.data_type == "ImageData" and topic.data_class is ImageData
    assert Topic("x", RegistryReading).data_type == "acme.registry_reading"
    assert Topic("x", RegistryReading).data_class is RegistryReading
    assert Topic("x").data_class is None
    with pytest.raises(InvalidTopicError):
        Topic("bad topic")


def test_unknown_topic_raises(client: Any, unique_topic: str) -> None:
    with pytest.raises(TopicNotFoundError, match="register_if_not_exist"):
        get_topic(client, unique_topic)
    with pytest.raises(ConfigError, match="data_type"):
        get_topic(client, unique_topic, register_if_not_exist=True)
    with pytest.raises(InvalidTopicError):
        get_topic(client, "not valid!", register_if_not_exist=True, data_type=ImageData)


def test_register_then_get(client: Any, unique_topic: str) -> None:
    created = get_topic(
        client, unique_topic, register_if_not_exist=True, data_type=ImageData, description="cam"
    )
    assert created.data_class is ImageData
    stored = json.loads(client.hget(REDIS_TOPICS_KEY, unique_topic))
    # msight-core 2.x layout: one hash, JSON value with the class path
    assert stored == {
        "name": unique_topic,
        "description": "cam",
        "data_type": "msight_core.data.image.ImageData",
    }
    again = get_topic(client, unique_topic)
    assert again == created
    assert unique_topic in list_topics(client)


def test_registry_wins_over_requested_type(
    client: Any, unique_topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    get_topic(client, unique_topic, register_if_not_exist=True, data_type=PointCloudData)
    topic = get_topic(client, unique_topic, register_if_not_exist=True, data_type=ImageData)
    assert topic.data_class is PointCloudData
    assert "registered with data type" in caplog.text


def test_entries_written_by_msight_core_2(client: Any, unique_topic: str) -> None:
    entry = {
        "name": unique_topic,
        "description": None,
        "data_type": "msight_core.data.base.SensorData",
    }
    client.hset(REDIS_TOPICS_KEY, unique_topic, json.dumps(entry))
    assert get_topic(client, unique_topic).data_class is SensorData
    # A class this process does not know: kept as text, never imported.
    entry["data_type"] = "os.system"
    client.hset(REDIS_TOPICS_KEY, unique_topic, json.dumps(entry))
    topic = get_topic(client, unique_topic)
    assert topic.data_type == "os.system" and topic.data_class is None


def test_malformed_entry(client: Any, unique_topic: str) -> None:
    client.hset(REDIS_TOPICS_KEY, unique_topic, b"{not json")
    with pytest.raises(InvalidTopicError, match="malformed"):
        get_topic(client, unique_topic)
    client.hdel(REDIS_TOPICS_KEY, unique_topic)


def test_concurrent_registration_agrees(client: Any, unique_topic: str, redis_server: Any) -> None:
    results: list[Topic] = []
    config = load_redis_config(redis_server.env())

    def register(data_type: type) -> None:
        c = get_redis_client(config)
        try:
            results.append(
                get_topic(c, unique_topic, register_if_not_exist=True, data_type=data_type)
            )
        finally:
            c.close()

    threads = [
        threading.Thread(target=register, args=(t,)) for t in (ImageData, PointCloudData) * 4
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 8 and len({r.data_type for r in results}) == 1


def test_topic_register_method(client: Any, unique_topic: str) -> None:
    Topic(unique_topic, RegistryReading, "mine").register(client)
    assert get_topic(client, unique_topic).data_class is RegistryReading
    Topic(unique_topic, ImageData).register(client, overwrite=False)
    assert get_topic(client, unique_topic).data_class is RegistryReading


def test_unreachable_redis_raises_broker_error() -> None:
    config = load_redis_config({}, port=free_port(), connect_timeout=0.5)
    c = get_redis_client(config)
    with pytest.raises(BrokerUnavailableError):
        get_topic(c, "some.topic")


RESERVED = ["_msight.large.x", "_msight.large.abc123", "_INBOX.x", "_INBOX.msight1.2"]


@pytest.mark.parametrize("name", RESERVED)
def test_reserved_prefixes_are_not_user_topics(name: str) -> None:
    """Issue 15 row 12: the NATS backend's own subjects are not user topics."""
    with pytest.raises(InvalidTopicError, match="reserved"):
        validate_topic_name(name)
    with pytest.raises(InvalidTopicError, match="reserved"):
        Topic(name)
    from msight_core.pubsub import get_pubsub

    with get_pubsub(env={"MSIGHT_PUBSUB_BACKEND": "memory"}) as backend:
        with pytest.raises(InvalidTopicError):
            backend.subscribe(name)
        with pytest.raises(InvalidTopicError):
            backend.publish(name, b"x")


@pytest.mark.parametrize("name", ["_inbox.x", "_INBOX", "_msight", "_msightx.a", "a._INBOX.x"])
def test_names_near_the_reserved_prefixes_stay_valid(name: str) -> None:
    # Case-sensitive, as NATS subjects are; only the two prefixes are taken.
    assert validate_topic_name(name) == name


def test_reserved_names_in_the_registry_are_skipped(
    client: Any, unique_topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    entry = {"name": "_INBOX.x", "description": None, "data_type": "SensorData"}
    client.hset(REDIS_TOPICS_KEY, "_INBOX.x", json.dumps(entry))
    try:
        assert "_INBOX.x" not in list_topics(client)
        assert "reserved" in caplog.text
    finally:
        client.hdel(REDIS_TOPICS_KEY, "_INBOX.x")


@pytest.mark.timeout(120)
def test_reserved_names_on_nats_while_its_own_subjects_still_work(
    nats_server: Any, unique_topic: str
) -> None:
    """Large frames travel on _msight.large.* and replies on _INBOX.*: not user topics."""
    pytest.importorskip("nats")
    from msight_core.pubsub import get_pubsub

    with get_pubsub(env=nats_server.env()) as backend:
        for name in RESERVED:
            with pytest.raises(InvalidTopicError):
                backend.subscribe(name)
            with pytest.raises(InvalidTopicError):
                backend.publish(name, b"x")
        backend.subscribe(unique_topic)
        frame = bytes(range(256)) * (3 * 4096)  # 3 MiB: above the 1 MB max_payload
        backend.publish(unique_topic, frame)
        backend.flush(30)
        message = backend.receive(60)
        assert message is not None and message.data == frame
