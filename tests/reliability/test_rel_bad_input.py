"""Bad input, property-tested: every case ends in success or the documented typed
error; never a hang, never an untyped exception, never a dead listening thread,
and nothing already accepted is lost because a later input was bad."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from _rel_env import env_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msight_core.config import (
    load_kafka_config,
    load_nats_config,
    load_publish_config,
    load_queue_config,
    load_redis_config,
)
from msight_core.data import BytesData, Data, SensorData
from msight_core.errors import (
    ConfigError,
    DeserializationError,
    InvalidTopicError,
    MissingDependencyError,
    PayloadTooLargeError,
)
from msight_core.pubsub import get_pubsub
from msight_core.testing.conformance import collect

MiB = 1024 * 1024
FAST = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class Recording(Mapping[str, str]):
    """An environment that records every variable the loaders look up."""

    def __init__(self, values: dict[str, str] | None = None) -> None:
        self.values = values or {}
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.asked.add(key)
        return self.values.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


def _all_variables() -> list[str]:
    recording = Recording()
    for load in (load_redis_config, load_nats_config, load_kafka_config):
        load(env=recording)
    load_queue_config(recording)
    load_publish_config(recording)
    return sorted(recording.asked | {"MSIGHT_PUBSUB_BACKEND"})


VARIABLES = _all_variables()
PASS_THROUGH = [
    "MSIGHT_KAFKA_PRODUCER_LINGER_MS",
    "MSIGHT_KAFKA_CONSUMER_SESSION_TIMEOUT_MS",
    "MSIGHT_KAFKA_CLIENT_SOCKET_TIMEOUT_MS",
]

garbage = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=300),
    st.sampled_from(
        [
            "",
            " ",
            "0",
            "-1",
            "1e309",
            "nan",
            "inf",
            "-inf",
            "1_000",
            "0x10",
            "99999999999999999999",
            "9" * 5000,
            "true",
            "FALSE",
            "[]",
            "['']",
            "['a:1',",
            "[a:1]]",
            "__import__('os')",
            "\x00",
            "nats://h:4222",
            "['nats://[::1]:4222']",
            "redis",
            "kafka",
            "nats",
            "memory",
            "drop_oldest",
            "block",
            "earliest",
            "x" * 100_000,
        ]
    ),
)


def _loaders(env: Mapping[str, str]) -> None:
    load_redis_config(env)
    load_nats_config(None, env=env)
    load_kafka_config(None, env=env)


def test_every_variable_is_known() -> None:
    # The list the properties below draw from is complete (read from the loaders).
    assert len(VARIABLES) >= 40
    for name in ("MSIGHT_NATS_SERVERS", "MSIGHT_KAFKA_SERVERS", "MSIGHT_QUEUE_OVERFLOW"):
        assert name in VARIABLES


@FAST
@given(data=st.data())
def test_any_msight_variables_give_a_config_or_config_error(data: st.DataObject) -> None:
    names = data.draw(st.lists(st.sampled_from(VARIABLES + PASS_THROUGH), min_size=1, max_size=6))
    env = {name: data.draw(garbage, label=name) for name in names}
    for step in (lambda: _loaders(env), lambda: get_pubsub(env=env).close()):
        try:
            step()
        except (ConfigError, MissingDependencyError):
            pass  # the documented outcome for a bad value


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(VARIABLES), value=garbage)
def test_one_bad_variable_names_itself(name: str, value: str) -> None:
    env = {name: value}
    try:
        _loaders(env)
        backend = get_pubsub(env=env)
    except ConfigError as exc:
        assert name in str(exc) or "MSIGHT" not in name, (name, str(exc))
        return
    except MissingDependencyError:
        return
    backend.close()


topic_names = st.one_of(
    st.text(max_size=260),
    st.text(alphabet="abcXYZ019._-", min_size=1, max_size=260),
    st.sampled_from(["", ".", "a..b", "a" * 249, "a" * 250, "a.*", "a>", "_INBOX.x", "\u00e9"]),
    st.integers(),
    st.none(),
    st.binary(max_size=20),
)
payloads = st.one_of(
    st.binary(max_size=4096),
    st.builds(bytearray, st.binary(max_size=100)),
    st.builds(memoryview, st.binary(max_size=100)),
    st.text(max_size=20),
    st.integers(),
    st.none(),
    st.floats(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@pytest.mark.parametrize("kind", ["redis", "nats", "kafka"])
def test_bad_topics_and_payloads_are_typed_and_lose_nothing(
    kind: str, request: pytest.FixtureRequest, unique_topic: str
) -> None:
    env = env_for(request, kind)
    sub = get_pubsub(env=env)
    sub.subscribe(unique_topic)
    pub = get_pubsub(env=env)
    accepted: list[bytes] = []
    counter = iter(range(1_000_000))
    # Valid random names would make Kafka create a topic each; keep them few there.
    examples = 40 if kind == "kafka" else 150

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(topic=topic_names, payload=payloads)
    def case(topic: Any, payload: Any) -> None:
        good = b"ok-%d" % next(counter)
        pub.publish(unique_topic, good)  # accepted before the bad input
        accepted.append(good)
        started = time.monotonic()
        try:
            pub.publish(topic, payload)
        except (InvalidTopicError, PayloadTooLargeError, TypeError):
            pass
        assert time.monotonic() - started < 15, "publish() took too long"

    case()
    pub.flush(30)
    got = {m.data for m in collect(sub, len(accepted), 60)}
    pub.close()
    sub.close()
    assert got == set(accepted), f"{len(set(accepted) - got)} accepted message(s) lost"


@pytest.mark.parametrize("size", [0, 1, 1000, MiB - 1024, MiB + 1, 5 * MiB])
def test_payload_sizes_on_core_nats_without_jetstream(size: int, unique_topic: str) -> None:
    from msight_core.testing.brokers import NatsServer

    with NatsServer(jetstream=False) as server, get_pubsub(env=server.env()) as backend:
        backend.subscribe(unique_topic)
        try:
            backend.publish(unique_topic, bytes(size))
        except PayloadTooLargeError:
            assert size > MiB - 256
            return
        backend.flush(10)
        assert [len(m.data) for m in collect(backend, 1, 10)] == [size]


VALID_MESSAGES = (
    SensorData(sensor_name="cam", frame_id=1, metadata={"a": [1, 2]}).serialize(),
    BytesData(b"payload" * 10).serialize(),
)


@st.composite
def corrupted(draw: st.DrawFn) -> bytes:
    base = draw(st.sampled_from(VALID_MESSAGES))
    raw = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        index = draw(st.integers(0, len(raw) - 1))
        raw[index] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(raw)))
    return bytes(raw[:cut]) + draw(st.binary(max_size=8))


@pytest.mark.parametrize("kind", ["redis", "nats"])
def test_corrupted_messages_never_kill_the_listening_loop(
    kind: str, request: pytest.FixtureRequest, unique_topic: str
) -> None:
    """A listen() loop decoding what arrives: garbage gives DeserializationError,
    the loop and the backend's reader stay alive, valid messages keep arriving."""
    env = env_for(request, kind)
    sub = get_pubsub(env=env)
    sub.subscribe(unique_topic)
    outcomes: dict[str, int] = {"ok": 0, "typed": 0}
    untyped: list[str] = []
    valid: list[int] = []
    finished = threading.Event()

    def application() -> None:
        try:
            for payload in sub.listen():
                try:
                    data = Data.deserialize(payload)
                except DeserializationError:
                    outcomes["typed"] += 1
                    continue
                except Exception as exc:  # noqa: BLE001 - recorded: must not happen
                    untyped.append(f"{type(exc).__name__}: {exc}")
                    continue
                outcomes["ok"] += 1
                if isinstance(data, SensorData) and data.sensor_name == "valid":
                    valid.append(data.frame_id)
        finally:
            finished.set()

    reader = threading.Thread(target=application, daemon=True)
    reader.start()
    sent_valid: list[int] = []
    with get_pubsub(env=env) as pub:

        @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
        @given(payload=corrupted())
        def case(payload: bytes) -> None:
            pub.publish(unique_topic, payload)
            frame = len(sent_valid) + 1
            pub.publish(unique_topic, SensorData(sensor_name="valid", frame_id=frame).serialize())
            sent_valid.append(frame)

        case()
        pub.flush(30)
    deadline = time.monotonic() + 30
    while len(valid) < len(sent_valid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reader.is_alive() and not finished.is_set(), "the listening loop died"
    sub.close()
    reader.join(5)
    assert not untyped, untyped[:5]
    assert valid == sent_valid, (outcomes, len(valid), len(sent_valid))
    assert outcomes["typed"] > 0
