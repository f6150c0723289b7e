"""Trace context on real brokers: headers on NATS and Kafka (never the payload), none on
Redis, nodes continuing the sender's trace, and hostile ``traceparent`` headers from a
raw nats-py peer (opentelemetry-sdk's in-memory exporter)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import nats
import pytest

otel_sdk = pytest.importorskip("opentelemetry.sdk.trace")

from confluent_kafka import Consumer
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from msight_core import tracing
from msight_core.aio import AsyncNATSPubSub
from msight_core.data import BytesData
from msight_core.nodes import DataProcessingNode, NodeConfig
from msight_core.pubsub import get_pubsub
from msight_core.pubsub.utils import get_nats_config

KAFKA_TEST_ENV = {"MSIGHT_KAFKA_CONSUMER_SESSION_TIMEOUT_MS": "6000"}
_EXPORTER = InMemorySpanExporter()
_ATTACHED: list[object] = []


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    if not isinstance(trace.get_tracer_provider(), otel_sdk.TracerProvider):
        trace.set_tracer_provider(otel_sdk.TracerProvider())
    provider = trace.get_tracer_provider()
    if provider not in _ATTACHED:
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))  # type: ignore[attr-defined]
        _ATTACHED.append(provider)
    _EXPORTER.clear()
    assert tracing.enabled()  # publishers see the provider from now on
    yield _EXPORTER
    _EXPORTER.clear()


def _env(request: pytest.FixtureRequest, broker: str) -> dict[str, str]:
    kind, _, variant = broker.partition("-")
    env = dict(request.getfixturevalue(f"{kind}_server").env())
    if kind == "kafka":
        env.update(KAFKA_TEST_ENV)
    if variant == "jetstream":
        env["MSIGHT_NATS_JETSTREAM"] = "true"
    return env


def _parent_of(headers: Any) -> trace.SpanContext:
    ctx = tracing.extract(headers)
    assert ctx is not None, headers
    return trace.get_current_span(ctx).get_span_context()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broker", ["nats", "nats-jetstream", "kafka", "redis"])
def test_a_publish_in_a_span_carries_it_in_headers_and_never_in_the_payload(
    broker: str, request: pytest.FixtureRequest, unique_topic: str, spans: Any
) -> None:
    env = _env(request, broker)
    payloads = [b"\x00plain", b"traceparent: 00-" + b"1" * 32, bytes(range(256)) * 8]
    with get_pubsub(env=env) as sub, get_pubsub(env=env) as pub:
        sub.subscribe(unique_topic)
        with trace.get_tracer("test").start_as_current_span("sender") as sender:
            for payload in payloads:
                pub.publish(unique_topic, payload)
        pub.publish(unique_topic, b"outside any span")
        pub.flush()
        got = []
        for _ in range(4):
            message = sub.receive(30)
            assert message is not None
            got.append((message.data, sub.received_headers()))
    # The bytes are unchanged (Kafka without MSIGHT_KAFKA_ORDERED: any order).
    assert sorted(data for data, _ in got) == sorted([*payloads, b"outside any span"])
    carried = dict(got)
    if broker == "redis":  # pub/sub without headers: documented, nothing carried
        assert all(headers is None for headers in carried.values())
        return
    sent = sender.get_span_context()
    for payload in payloads:
        parent = _parent_of(carried[payload])
        assert (parent.trace_id, parent.span_id) == (sent.trace_id, sent.span_id)
    assert tracing.extract(carried[b"outside any span"]) is None


@pytest.mark.timeout(120)
def test_raw_subscribers_see_the_payload_and_a_traceparent_header(
    nats_server: Any, kafka_server: Any, unique_topic: str, spans: Any
) -> None:
    """What a plain NATS or Kafka client receives: the exact bytes, a W3C header."""
    nats_env = nats_server.env()
    kafka_env = {**kafka_server.env(), **KAFKA_TEST_ENV}

    async def raw_nats() -> Any:
        nc = await nats.connect(nats_server.url)
        sub = await nc.subscribe(unique_topic)
        await nc.flush()
        with get_pubsub(env=nats_env) as pub:
            with trace.get_tracer("test").start_as_current_span("sender"):
                pub.publish(unique_topic, b"payload")
            pub.flush()
        msg = await sub.next_msg(10)
        await nc.close()
        return msg

    msg = asyncio.run(raw_nats())
    assert msg.data == b"payload"
    assert msg.headers["traceparent"].startswith("00-")

    with get_pubsub(env=kafka_env) as pub:
        with trace.get_tracer("test").start_as_current_span("sender"):
            pub.publish(unique_topic, b"payload")
        pub.flush()
    consumer = Consumer(
        {
            "bootstrap.servers": kafka_server.address,
            "group.id": "raw-" + unique_topic,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        consumer.subscribe([unique_topic])
        deadline = time.monotonic() + 60
        record = None
        while record is None and time.monotonic() < deadline:
            polled = consumer.poll(1.0)
            if polled is not None and polled.error() is None:
                record = polled
    finally:
        consumer.close()
    assert record is not None and record.value() == b"payload"
    headers = dict(record.headers() or [])
    assert headers[b"traceparent".decode()].startswith(b"00-")


class Relay(DataProcessingNode):
    def process(self, data: Any) -> Any:
        return data


class Sink(DataProcessingNode):
    def process(self, data: Any) -> None:
        return None


def _spin(node: Any) -> threading.Thread:
    thread = threading.Thread(target=node.spin, kwargs={"handle_signals": False}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while node.status.value != "running":
        assert time.monotonic() < deadline, "the node did not start"
        time.sleep(0.02)
    return thread


@pytest.mark.timeout(180)
@pytest.mark.parametrize("broker", ["nats", "nats-jetstream", "kafka"])
def test_a_node_continues_the_trace_across_the_broker(
    broker: str, request: pytest.FixtureRequest, unique_topic: str, spans: InMemorySpanExporter
) -> None:
    env = _env(request, broker)
    frames, out = unique_topic + ".in", unique_topic + ".out"
    relay = Relay(
        NodeConfig(name="relay", subscribe_topic_name=frames, publish_topic_name=out,
                   register_topics=False, stats_interval=0),
        env=env,
    )  # fmt: skip
    thread = _spin(relay)
    try:
        with get_pubsub(env=env) as sink, get_pubsub(env=env) as pub:
            sink.subscribe(out)
            payload = BytesData(data=b"x" * 100, sensor_name="cam").serialize()
            with trace.get_tracer("test").start_as_current_span("camera") as camera:
                pub.publish(frames, payload)
            pub.flush()
            message = sink.receive(60)
            assert message is not None and message.data == payload
            relayed = _parent_of(sink.received_headers())
    finally:
        relay.stop()
        thread.join(30)
    sent = camera.get_span_context()
    (span,) = [s for s in spans.get_finished_spans() if s.name == f"process {frames}"]
    assert span.parent is not None and span.parent.span_id == sent.span_id
    assert span.context.trace_id == sent.trace_id
    assert span.attributes["messaging.system"] == broker.split("-")[0]
    # What the node published while processing carries the node's span.
    assert (relayed.trace_id, relayed.span_id) == (span.context.trace_id, span.context.span_id)


HOSTILE = [
    {"traceparent": "00-zz-not-valid"},
    {"traceparent": "00-" + "0" * 32 + "-" + "1" * 16 + "-01"},  # all-zero trace id
    {"traceparent": "00-" + "1" * 32 + "-" + "0" * 16 + "-01"},  # all-zero span id
    {"traceparent": "ff-" + "1" * 32 + "-" + "1" * 16 + "-01"},  # forbidden version
    {"traceparent": "00-" + "a" * 4000},  # oversized
    # A valid traceparent followed by junk: cut short, it would pass.
    {
        "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01" + "0" * 2000,
        "tracestate": "x" * 3000,
    },
    {"traceparent": "", "tracestate": "k=v"},
    {"tracestate": "only=state"},
]
VALID = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("broker", ["nats", "nats-jetstream"])
def test_forged_traceparents_from_a_raw_peer_cost_nothing_and_are_not_trusted(
    broker: str, request: pytest.FixtureRequest, unique_topic: str, spans: InMemorySpanExporter
) -> None:
    """A raw nats-py peer publishes messages with garbage trace headers, then one with
    a valid one: the node processes every message, each bad one in a trace of its
    own (never a parent made up from the garbage), the valid one as its child."""
    env = _env(request, broker)
    frames = unique_topic + ".in"
    relay = Sink(
        NodeConfig(name="relay", subscribe_topic_name=frames, register_topics=False,
                   stats_interval=0),
        env=env,
    )  # fmt: skip
    thread = _spin(relay)
    payload = BytesData(data=b"y", sensor_name="cam").serialize()
    server = request.getfixturevalue("nats_server")

    async def forge() -> None:
        nc = await nats.connect(server.url)
        for headers in [*HOSTILE, {"traceparent": VALID}]:
            await nc.publish(frames, payload, headers=headers)
        await nc.flush()
        await nc.close()

    try:
        asyncio.run(forge())
        deadline = time.monotonic() + 60
        while relay.stats.snapshot()["processed"] < len(HOSTILE) + 1:
            assert time.monotonic() < deadline, relay.stats.snapshot()
            time.sleep(0.05)
    finally:
        relay.stop()
        thread.join(30)
    processed = [s for s in spans.get_finished_spans() if s.name == f"process {frames}"]
    assert len(processed) == len(HOSTILE) + 1
    *bad, good = processed
    assert [i for i, s in enumerate(bad) if s.parent is not None] == []
    assert len({s.context.trace_id for s in bad}) == len(bad)
    assert good.parent is not None and f"{good.parent.span_id:016x}" == "cd" * 8
    assert f"{good.context.trace_id:032x}" == "ab" * 16


@pytest.mark.timeout(60)
def test_the_async_nats_backend_carries_trace_context_too(
    nats_server: Any, unique_topic: str, spans: Any
) -> None:
    env = nats_server.env()

    async def scenario() -> tuple[Any, Any, bytes]:
        async with (
            AsyncNATSPubSub(get_nats_config(env=env)) as sub,
            AsyncNATSPubSub(get_nats_config(env=env)) as pub,
        ):
            await sub.subscribe(unique_topic)
            with trace.get_tracer("test").start_as_current_span("sender") as span:
                await pub.publish(unique_topic, b"first")  # the topic's first: awaited
                await pub.publish(unique_topic, b"second")  # straight to the buffer
            await pub.flush()
            first = await sub.receive(10)
            headers = sub.received_headers()
            second = await sub.receive(10)
            assert first is not None and first.data == b"first"
            assert second is not None
            return span.get_span_context(), (headers, sub.received_headers()), second.data

    sent, (first, second), data = asyncio.run(scenario())
    assert data == b"second"
    for headers in (first, second):
        parent = _parent_of(headers)
        assert (parent.trace_id, parent.span_id) == (sent.trace_id, sent.span_id)
