"""W3C trace context across msight messages (optional extra ``otel``: ``opentelemetry-api``).

When ``opentelemetry-api`` is installed and the application has set up a tracer
provider (``opentelemetry.trace.set_tracer_provider(...)``, e.g. the SDK with an
OTLP exporter), msight carries the trace from one node to the next:

* a publisher puts the current span's ``traceparent`` (and ``tracestate``) into
  the message's *headers*, where the broker has headers: NATS and Kafka. Redis
  pub/sub has no headers, and the payload bytes never change, so on Redis every
  node starts a new trace per message (nothing is lost but the link);
* a processing node runs each message in a ``process <topic>`` span (kind
  ``CONSUMER``) whose parent is the context from the message's headers, so what
  it publishes while processing continues the same trace; a source node runs
  each published frame in a ``publish <topic>`` span (kind ``PRODUCER``), where
  traces start.

Nothing here costs anything without the extra or without a configured provider:
:func:`node_tracer` returns ``None`` and the nodes skip tracing entirely.
:func:`inject` and :func:`extract` are the propagation helpers a backend's
publisher and subscriber use (``traceparent`` is the only header they need to
know); they return empty results when tracing is off.

Backends expose received headers through an optional method,
``received_headers()``: the headers of the message ``listen()``/``receive()``
handed out last (``None`` if it had none). Nodes use it when it is there.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

__all__ = [
    "TRACE_HEADERS",
    "NodeTracer",
    "available",
    "enabled",
    "extract",
    "inject",
    "node_tracer",
    "outgoing",
]

#: The header names W3C trace context uses (what a publisher may add).
TRACE_HEADERS = ("traceparent", "tracestate")
#: Longest header value read from a peer or written (W3C: traceparent is 55
#: characters, tracestate at most 512): a longer value is ignored.
MAX_VALUE = 512
_RECHECK = 1.0  # seconds between two looks for a tracer provider while none is set
_provider_seen = False  # a provider is set (it cannot be unset)
_next_look = 0.0

try:
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
except ImportError:  # the extra is not installed: tracing is off
    _trace = None  # type: ignore[assignment]


def available() -> bool:
    """``opentelemetry-api`` is installed."""
    return _trace is not None


def enabled() -> bool:
    """Tracing is on: the API is installed and a real tracer provider is set.

    The API's default provider (a proxy until something is set) records
    nothing, so without one there is nothing to carry.
    """
    global _provider_seen
    if _trace is None:
        return False
    provider = _trace.get_tracer_provider()
    on = not isinstance(provider, (_trace.ProxyTracerProvider, _trace.NoOpTracerProvider))
    _provider_seen = _provider_seen or on  # publishers need not look again (see outgoing)
    return on


def outgoing() -> dict[str, str] | None:
    """The trace headers a publisher adds to a message now, or ``None``.

    ``None`` (at the cost of a clock read) while tracing is off or no span is
    active: the per-message check of every publisher with headers. Whether a
    tracer provider is set is looked up at most once a second until one is
    (it cannot be unset), since the lookup costs microseconds; :func:`enabled`
    returning true ends the wait at once.
    """
    global _provider_seen, _next_look
    if _trace is None:
        return None
    if not _provider_seen:
        now = time.monotonic()
        if now < _next_look:
            return None
        _next_look = now + _RECHECK
        if not enabled():
            return None
        _provider_seen = True
    if not _trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _propagate.inject(carrier)
    out = {k: v for k, v in carrier.items() if k in TRACE_HEADERS and len(v) <= MAX_VALUE}
    return out or None


def inject(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Add the current span's trace context to ``headers`` (a new dict if ``None``).

    Returns the dict, unchanged when tracing is off or no span is active. For
    publishers of brokers with headers (NATS, Kafka).
    """
    carrier = {} if headers is None else headers
    if _trace is not None and _trace.get_current_span().get_span_context().is_valid:
        _propagate.inject(carrier)
    return carrier


def extract(headers: Any) -> Any:
    """The trace context carried by ``headers``, or ``None``.

    ``headers`` is a mapping or ``(name, value)`` pairs (Kafka's), with ``str``
    or ``bytes`` values, from a peer: untrusted. Only the :data:`TRACE_HEADERS`
    are read (the first of each name); a value longer than :data:`MAX_VALUE` is
    ignored (never cut: cutting could make garbage look valid), bytes are
    decoded as ASCII; a ``traceparent`` that is not valid W3C trace context
    (the propagator checks version, lengths, hex digits, all-zero ids) gives
    ``None``. Never raises on bad input; ``None`` when tracing is off.
    """
    if _trace is None or not headers:
        return None
    carrier: dict[str, str] = {}
    try:
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        for pair in pairs:
            key, value = pair
            if not isinstance(key, str) or key not in TRACE_HEADERS or key in carrier:
                continue
            if isinstance(value, (bytes, bytearray, memoryview)):
                if len(value) > MAX_VALUE:
                    continue
                value = bytes(value).decode("ascii", "replace")
            if isinstance(value, str) and len(value) <= MAX_VALUE:
                carrier[key] = value
    except (TypeError, ValueError):  # not a mapping nor pairs: carries nothing
        return None
    if "traceparent" not in carrier:
        return None
    try:
        ctx = _propagate.extract(carrier)
    except Exception:  # noqa: BLE001 - a propagator must not fail a message
        return None
    return ctx if _trace.get_current_span(ctx).get_span_context().is_valid else None


class NodeTracer:
    """The spans of one node. Made by :func:`node_tracer` only when tracing is on.

    Args:
        node: the node's name (attribute ``msight.node``).
        topic: the node's subscribe topic (sources: publish topic).
        system: the ``messaging.system`` attribute (``redis``, ``nats``, ``kafka`` ...).
        headers: returns the headers of the message in hand, or ``None``.
    """

    def __init__(
        self,
        node: str,
        topic: str,
        system: str,
        headers: Callable[[], Mapping[str, Any] | None] | None,
    ) -> None:
        assert _trace is not None
        self._tracer = _trace.get_tracer("msight_core")
        self._headers = headers
        self._attributes = {
            "messaging.system": system,
            "messaging.destination.name": topic,
            "msight.node": node,
        }
        self._process_name = f"process {topic}"
        self._publish_name = f"publish {topic}"

    @contextlib.contextmanager
    def processing(self) -> Iterator[Any]:
        """A ``CONSUMER`` span for the message in hand, child of its sender's span."""
        parent = None
        if self._headers is not None:
            try:
                parent = extract(self._headers())
            except Exception:  # noqa: BLE001 - a peer's headers never stop processing
                parent = None
        with self._tracer.start_as_current_span(
            self._process_name,
            context=parent,
            kind=_trace.SpanKind.CONSUMER,
            attributes=self._attributes,
        ) as span:
            yield span

    @contextlib.contextmanager
    def producing(self) -> Iterator[Any]:
        """A ``PRODUCER`` span around a source's publish, unless a span is active."""
        if _trace.get_current_span().get_span_context().is_valid:
            yield None
            return
        with self._tracer.start_as_current_span(
            self._publish_name, kind=_trace.SpanKind.PRODUCER, attributes=self._attributes
        ) as span:
            yield span


def node_tracer(name: str, topic: str, backend: Any) -> NodeTracer | None:
    """A :class:`NodeTracer` for a node, or ``None`` when tracing is off.

    Args:
        name: the node's name.
        topic: its subscribe (or publish) topic.
        backend: its pub/sub backend; its ``received_headers()``, if it has one,
            gives the parent context of each processed message.
    """
    if not enabled():
        return None
    system = type(backend).__name__.replace("PubSub", "").lower()
    headers = getattr(backend, "received_headers", None)
    return NodeTracer(name, topic, system, headers if callable(headers) else None)
