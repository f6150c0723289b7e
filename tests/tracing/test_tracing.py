"""Trace context: the propagation helpers and the nodes' spans (opentelemetry SDK in memory)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

otel_sdk = pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from msight_core import tracing
from msight_core.data import BytesData
from msight_core.nodes import DataProcessingNode, NodeConfig, SourceNode
from msight_core.pubsub.memory import MemoryBroker, MemoryPubSub

_EXPORTER = InMemorySpanExporter()
_ATTACHED: list[object] = []


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    # The provider is process-wide and set once (another test, or a docs example,
    # may have set it already): attach our exporter to whichever it is.
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


def test_inject_and_extract_carry_the_current_span(spans: InMemorySpanExporter) -> None:
    assert tracing.enabled()
    assert tracing.inject() == {}  # no span: nothing to carry
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("sender") as span:
        headers = tracing.inject()
        sent = span.get_span_context()
    assert headers["traceparent"].startswith(f"00-{sent.trace_id:032x}-{sent.span_id:016x}-")
    ctx = tracing.extract({"traceparent": headers["traceparent"].encode()})  # bytes values too
    assert trace.get_current_span(ctx).get_span_context().trace_id == sent.trace_id
    assert tracing.extract({"traceparent": "00-zz-not-valid"}) is None
    assert tracing.extract({"other": "x"}) is None
    assert tracing.extract(None) is None


class HeaderMemory(MemoryPubSub):
    """A memory backend whose received messages carry the given headers (as NATS would)."""

    headers: dict[str, str] | None = None

    def received_headers(self) -> dict[str, str] | None:
        return self.headers


class Relay(DataProcessingNode):
    def process(self, data: Any) -> Any:
        return data


class Sink(DataProcessingNode):
    def process(self, data: Any) -> None:
        return None


class Camera(SourceNode):
    def get_data(self) -> BytesData:
        return BytesData(data=b"frame", sensor_name="cam")


def _spin(node: Any, **kw: Any) -> threading.Thread:
    thread = threading.Thread(target=node.spin, kwargs={"handle_signals": False, **kw})
    thread.start()
    return thread


def test_a_node_continues_the_senders_trace_and_payloads_are_unchanged(
    spans: InMemorySpanExporter,
) -> None:
    broker = MemoryBroker()
    backend = HeaderMemory(broker=broker)
    with trace.get_tracer("test").start_as_current_span("upstream") as upstream:
        backend.headers = tracing.inject()
        parent = upstream.get_span_context()
    out = MemoryPubSub(broker=broker)
    out.subscribe("t.out")
    relay = Relay(
        NodeConfig(name="relay", subscribe_topic_name="t.in", publish_topic_name="t.out",
                   register_topics=False, stats_interval=0),
        backend,
    )  # fmt: skip
    thread = _spin(relay)
    while relay.status.value != "running":
        time.sleep(0.01)
    payload = BytesData(data=b"x" * 100, sensor_name="cam").serialize()
    MemoryPubSub(broker=broker).publish("t.in", payload)
    message = out.receive(5)
    relay.stop()
    thread.join(10)
    assert message is not None and message.data == payload  # bytes never change
    (span,) = [s for s in spans.get_finished_spans() if s.name == "process t.in"]
    assert span.kind is trace.SpanKind.CONSUMER
    assert span.parent is not None and span.parent.span_id == parent.span_id
    assert span.context.trace_id == parent.trace_id
    assert span.attributes["msight.node"] == "relay"
    assert span.attributes["messaging.system"] == "headermemory"


def test_without_headers_each_message_starts_a_trace(spans: InMemorySpanExporter) -> None:
    broker = MemoryBroker()
    relay = Sink(
        NodeConfig(name="relay", subscribe_topic_name="t.in", register_topics=False,
                   stats_interval=0),
        MemoryPubSub(broker=broker),
    )  # fmt: skip
    thread = _spin(relay, life_span=2)
    while relay.status.value != "running":
        time.sleep(0.01)
    pub = MemoryPubSub(broker=broker)
    for _ in range(2):
        pub.publish("t.in", BytesData(data=b"x", sensor_name="cam").serialize())
    thread.join(10)
    processed = [s for s in spans.get_finished_spans() if s.name == "process t.in"]
    assert len(processed) == 2 and all(s.parent is None for s in processed)
    assert processed[0].context.trace_id != processed[1].context.trace_id


def test_a_source_starts_a_trace_per_frame(spans: InMemorySpanExporter) -> None:
    camera = Camera(
        NodeConfig(name="cam", publish_topic_name="t.frames", register_topics=False,
                   stats_interval=0),
        MemoryPubSub(broker=MemoryBroker()),
    )  # fmt: skip
    camera.spin(life_span=3, handle_signals=False)
    produced = [s for s in spans.get_finished_spans() if s.name == "publish t.frames"]
    assert len(produced) == 3
    assert all(s.kind is trace.SpanKind.PRODUCER and s.parent is None for s in produced)


@pytest.mark.parametrize(
    "setup",
    [
        "",  # the API without a configured provider: off
        "sys.modules['opentelemetry'] = None\n",  # the extra not installed: off
    ],
)
def test_tracing_is_off_without_a_provider_or_the_extra(setup: str) -> None:
    script = (
        "import sys\n" + setup + "from msight_core import tracing\n"
        "from msight_core.pubsub.memory import MemoryPubSub\n"
        "print(tracing.enabled(), tracing.node_tracer('n', 't', MemoryPubSub()), "
        "tracing.inject(), tracing.extract({'traceparent': 'x'}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "None", "{}", "None"]


def test_extract_takes_pairs_and_refuses_what_is_not_w3c(spans: InMemorySpanExporter) -> None:
    valid = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    ctx = tracing.extract([("other", b"x"), ("traceparent", valid.encode())])  # Kafka's pairs
    assert f"{trace.get_current_span(ctx).get_span_context().span_id:016x}" == "cd" * 8
    for bad in (
        {"traceparent": valid + "0" * 600},  # too long: ignored, never cut to size
        {"traceparent": valid.encode() + b"\xff"},  # not ASCII
        {"traceparent": valid.upper()},  # W3C wants lowercase hex
        {"traceparent": 12},
        [("traceparent",)],  # not pairs
        42,  # not headers at all
    ):
        assert tracing.extract(bad) is None, bad
    headers = tracing.outgoing()
    assert headers is None  # no active span: nothing to add
    with trace.get_tracer("test").start_as_current_span("s"):
        assert set(tracing.outgoing() or {}) == {"traceparent"}
