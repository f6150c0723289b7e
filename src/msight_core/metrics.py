"""Prometheus metrics of the nodes: ``/metrics`` on ``MSIGHT_METRICS_PORT`` (extra ``metrics``).

A node with a metrics port (``MSIGHT_METRICS_PORT=9108``, ``NodeConfig.metrics_port``
or ``Node(..., metrics_port=...)``) serves, for its topics and backend (labels
``node``, ``topic``, ``backend``):

==========================================  =========  ==========================================
metric                                      type       from
==========================================  =========  ==========================================
``msight_messages_published_total``         counter    the node's statistics (publish topic)
``msight_bytes_published_total``            counter    idem
``msight_messages_received_total``          counter    the node's statistics (subscribe topic)
``msight_bytes_received_total``             counter    idem
``msight_messages_skipped_total``           counter    frames left out by ``gap``
``msight_messages_dropped_total``           counter    by ``reason``: ``queue_full`` (receive
                                                       queue overflow), ``undecodable`` (not a
                                                       valid message), ``slow_consumer`` (NATS),
                                                       ``unsubscribed`` (Redis), ``malformed``,
                                                       ``incomplete_frame``, ``large_frame_lost``,
                                                       ``connection_lost`` (publish side, counted
                                                       by the backend as possibly lost)
``msight_receive_queue_messages``           gauge      messages waiting for the node
``msight_receive_queue_bytes``              gauge      their bytes
``msight_broker_reconnects_total``          counter    reconnects the backend counted
``msight_node_errors_total``                counter    handling errors (any policy)
``msight_processing_seconds``               histogram  time to handle one message or frame
``msight_latency_seconds``                  histogram  now minus the data's capture timestamp
==========================================  =========  ==========================================

Cost: the counters are the node's existing statistics and the backend's
``stats()``, read only when Prometheus scrapes (a custom collector); per
message the node adds two histogram observations (a ``bisect`` and two
additions each, no lock). Importing :mod:`msight_core` does not import
``prometheus_client``; this module does, and raises
:class:`~msight_core.errors.MissingDependencyError` with the install hint when
the extra is missing. Nodes of one process with the same port share one
endpoint; each node's series carry its name.
"""

from __future__ import annotations

import http.server
import itertools
import logging
import threading
from bisect import bisect_right
from collections.abc import Callable, Iterator
from typing import Any

from .errors import ConfigError, MissingDependencyError

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.process_collector import ProcessCollector
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingDependencyError("prometheus-client", "metrics") from exc

__all__ = [
    "FOLD",
    "LATENCY_BUCKETS",
    "PROCESSING_BUCKETS",
    "Histogram",
    "MetricsEndpoint",
    "NodeCollector",
    "NodeObserver",
    "backend_label",
]

logger = logging.getLogger(__name__)

#: Upper bounds (seconds) of the ``msight_processing_seconds`` buckets.
PROCESSING_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
#: Messages observed before the pending values are counted into the histograms.
FOLD = 4096
#: Upper bounds (seconds) of the ``msight_latency_seconds`` buckets.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# stats() key -> drop reason; per topic ("dropped" dict) or per backend.
_DROPS = {
    "slow_consumer_drops": "slow_consumer",
    "unexpected_messages": "unsubscribed",
    "malformed_dropped": "malformed",
    "incomplete_frames_dropped": "incomplete_frame",
    "large_frames_lost": "large_frame_lost",
}
_RECONNECTS = ("reconnects", "subscriber_reconnects", "publisher_reconnects")
_BACKENDS = {
    "RedisPubSub": "redis",
    "NATSPubSub": "nats",
    "KafkaPubSub": "kafka",
    "MemoryPubSub": "memory",
    "ShmPubSub": "shm",
}


def backend_label(backend: object) -> str:
    """The ``backend`` label of a backend: ``redis``, ``nats`` ... or its class name."""
    name = type(backend).__name__
    return _BACKENDS.get(name, name)


class Histogram:
    """Fixed buckets; values arrive in batches (:meth:`add`).

    Thread-safe: :meth:`add` and :meth:`buckets` take a lock, once per batch.
    """

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def add(self, values: list[float]) -> None:
        """Count ``values`` (negative ones as 0: a capture clock ahead of ours)."""
        if not values:
            return
        counts, total = self._count(values)
        with self._lock:
            self._counts = [a + b for a, b in zip(self._counts, counts)]
            self._sum += total

    def _count(self, values: list[float]) -> tuple[list[int], float]:
        # Sorted once (in C), then one bisect per bound: values <= bound (Prometheus'
        # le); a negative value counts in the first bucket. Cheaper than a bisect
        # per value, and far cheaper per node than numpy, whose calls slow the
        # node's own decoding down more than they save.
        ordered = sorted(values)
        cumulative = [bisect_right(ordered, bound) for bound in self.bounds]
        cumulative.append(len(ordered))
        counts = [b - a for a, b in zip([0, *cumulative[:-1]], cumulative)]
        total = sum(ordered) if ordered[0] >= 0 else sum(v for v in ordered if v > 0)
        return counts, total

    def buckets(self, pending: list[float] | None = None) -> tuple[list[tuple[str, float]], float]:
        """Cumulative ``(le, count)`` pairs ending with ``+Inf``, and the sum;
        ``pending`` values are included without being added."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        if pending:
            extra, extra_sum = self._count(pending)
            counts = [a + b for a, b in zip(counts, extra)]
            total += extra_sum
        labels = [repr(float(b)) for b in self.bounds] + ["+Inf"]
        return [(le, float(c)) for le, c in zip(labels, itertools.accumulate(counts))], total


class NodeObserver:
    """What a node's statistics call per handled message (``NodeStats.observer``).

    :meth:`observe` only appends to two lists (the node's thread); every
    :data:`FOLD` messages they are counted into the histograms in one go.
    A scrape counts what is still pending too, without taking it.
    """

    __slots__ = ("_latency", "_lock", "_processing", "latency", "processing", "undecodable")

    def __init__(self) -> None:
        self.processing = Histogram(PROCESSING_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.undecodable = 0
        self._processing: list[float] = []
        self._latency: list[float] = []
        self._lock = threading.Lock()

    def observe(self, seconds: float, latency: float | None) -> None:
        self._processing.append(seconds)
        if latency is not None:
            self._latency.append(latency)
        if len(self._processing) >= FOLD:
            self.fold()

    def fold(self) -> None:
        """Count the pending values into the histograms (the node's thread)."""
        with self._lock:
            processing, self._processing = self._processing, []
            latency, self._latency = self._latency, []
            self.processing.add(processing)
            self.latency.add(latency)

    def snapshot(self) -> tuple[tuple[list[tuple[str, float]], float], ...]:
        """``(buckets, sum)`` of processing time and of latency (any thread)."""
        with self._lock:
            processing, latency = list(self._processing), list(self._latency)
            return self.processing.buckets(processing), self.latency.buckets(latency)

    def rejected(self) -> None:
        """A received message that did not decode."""
        self.undecodable += 1


class NodeCollector:
    """Builds one node's series at scrape time (a ``prometheus_client`` collector).

    Args:
        node: the node's name (label ``node``).
        backend: the ``backend`` label.
        in_topic: the subscribe topic, or ``None``.
        out_topic: the publish topic, or ``None``.
        totals: returns the node's statistics (``NodeStats.snapshot``).
        backend_stats: returns the backend's ``stats()``, or ``None`` if it has none.
        observer: the node's histograms and drop counts.
    """

    def __init__(
        self,
        node: str,
        backend: str,
        in_topic: str | None,
        out_topic: str | None,
        totals: Callable[[], dict[str, Any]],
        backend_stats: Callable[[], dict[str, Any]] | None,
        observer: NodeObserver,
    ) -> None:
        self.node = node
        self.backend = backend
        self.in_topic = in_topic
        self.out_topic = out_topic
        self._totals = totals
        self._backend_stats = backend_stats
        self._observer = observer

    def describe(self) -> list[Metric]:
        return []  # no registration-time collect(): series are built per scrape

    def collect(self) -> Iterator[Metric]:
        labels = ["node", "topic", "backend"]
        node, backend = self.node, self.backend
        t = self._totals()
        stats = self._read_backend()
        main = self.in_topic or self.out_topic or ""

        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=labels)

        if self.out_topic is not None:
            out = [node, self.out_topic, backend]
            fam = counter("msight_messages_published", "Messages the node published.")
            fam.add_metric(out, t["published"])
            yield fam
            fam = counter("msight_bytes_published", "Payload bytes the node published.")
            fam.add_metric(out, t["bytes_out"])
            yield fam
        if self.in_topic is not None:
            into = [node, self.in_topic, backend]
            fam = counter("msight_messages_received", "Messages the node received.")
            fam.add_metric(into, t["received"])
            yield fam
            fam = counter("msight_bytes_received", "Payload bytes the node received.")
            fam.add_metric(into, t["bytes_in"])
            yield fam
        fam = counter("msight_messages_skipped", "Frames left out by the node's gap setting.")
        fam.add_metric([node, main, backend], t["skipped"])
        yield fam
        yield self._drops(stats)
        fam = counter("msight_node_errors", "Errors while handling messages or frames.")
        fam.add_metric([node, main, backend], t["errors"])
        yield fam
        if self.in_topic is not None and "queued" in stats:
            into = [node, self.in_topic, backend]
            gauge = GaugeMetricFamily(
                "msight_receive_queue_messages", "Messages waiting for the node.", labels=labels
            )
            gauge.add_metric(into, stats.get("queued", 0))
            yield gauge
            gauge = GaugeMetricFamily(
                "msight_receive_queue_bytes", "Bytes waiting for the node.", labels=labels
            )
            gauge.add_metric(into, stats.get("queued_bytes", 0))
            yield gauge
        reconnects = [stats[k] for k in _RECONNECTS if isinstance(stats.get(k), (int, float))]
        if reconnects:
            fam = CounterMetricFamily(
                "msight_broker_reconnects",
                "Times the backend lost and re-established its broker connection.",
                labels=["node", "backend"],
            )
            fam.add_metric([node, backend], sum(reconnects))
            yield fam
        processing, latency = self._observer.snapshot()
        yield self._histogram(
            "msight_processing_seconds",
            "Seconds to handle one message or produce one frame.",
            processing,
            [node, main, backend],
        )
        if self.in_topic is not None:
            yield self._histogram(
                "msight_latency_seconds",
                "Seconds from the data's capture timestamp to its handling.",
                latency,
                [node, self.in_topic, backend],
            )

    def _read_backend(self) -> dict[str, Any]:
        if self._backend_stats is None:
            return {}
        try:
            stats = self._backend_stats()
        except Exception:
            logger.debug("backend stats() failed during a scrape", exc_info=True)
            return {}
        return stats if isinstance(stats, dict) else {}

    def _drops(self, stats: dict[str, Any]) -> CounterMetricFamily:
        node, backend = self.node, self.backend
        fam = CounterMetricFamily(
            "msight_messages_dropped",
            "Messages lost before the application handled them, by reason.",
            labels=["node", "topic", "backend", "reason"],
        )
        if self.in_topic is not None:
            dropped = stats.get("dropped")
            per_topic = dropped if isinstance(dropped, dict) else {}
            fam.add_metric(
                [node, self.in_topic, backend, "queue_full"], per_topic.get(self.in_topic, 0)
            )
            fam.add_metric(
                [node, self.in_topic, backend, "undecodable"], self._observer.undecodable
            )
            for key, reason in _DROPS.items():
                value = stats.get(key)
                if isinstance(value, (int, float)):
                    fam.add_metric([node, self.in_topic, backend, reason], value)
        lost = stats.get("possibly_lost")
        if self.out_topic is not None and isinstance(lost, (int, float)):
            fam.add_metric([node, self.out_topic, backend, "connection_lost"], lost)
        return fam

    @staticmethod
    def _histogram(
        name: str, doc: str, snapshot: tuple[list[tuple[str, float]], float], values: list[str]
    ) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(name, doc, labels=["node", "topic", "backend"])
        buckets, total = snapshot
        fam.add_metric(values, buckets, total)
        return fam


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        try:
            body = generate_latest(self.server.registry)  # type: ignore[attr-defined]
        except Exception:
            logger.exception("building /metrics failed")
            self.send_error(500)
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("metrics: " + format, *args)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        self.users = 0


_servers: dict[tuple[str, int], _Server] = {}
_servers_lock = threading.Lock()


class MetricsEndpoint:
    """One node's collector on a (possibly shared) ``/metrics`` HTTP endpoint.

    Args:
        collector: the node's collector.
        address: address to listen on.
        port: TCP port; ``0`` picks a free one (then shared by the nodes of this
            process that also ask for ``0``).

    Raises:
        ConfigError: the port cannot be bound (in use by another process, say).

    Serving runs on a daemon thread. :meth:`close` removes the collector and
    stops the server when its last node leaves; idempotent, any thread.
    """

    def __init__(self, collector: NodeCollector, address: str, port: int) -> None:
        self._collector = collector
        with _servers_lock:
            server = _servers.get((address, port))
            if server is None:
                try:
                    server = _Server((address, port))
                except OSError as exc:  # in use, or an address not of this host
                    raise ConfigError(
                        f"cannot serve metrics on {address}:{port} ({exc.strerror or exc}); "
                        "choose another MSIGHT_METRICS_PORT / metrics_port"
                    ) from exc
                threading.Thread(
                    target=server.serve_forever, name="msight-metrics", daemon=True
                ).start()
                _servers[(address, port)] = server
            server.registry.register(collector)  # type: ignore[arg-type]
            server.users += 1
        self._server: _Server | None = server
        host, bound = server.server_address[:2]
        self.address = str(host)
        self.port = int(bound)
        shown = "127.0.0.1" if self.address == "0.0.0.0" else self.address
        self.url = f"http://{shown}:{self.port}/metrics"

    def close(self) -> None:
        with _servers_lock:
            server, self._server = self._server, None
            if server is None:
                return
            server.registry.unregister(self._collector)  # type: ignore[arg-type]
            server.users -= 1
            last = server.users <= 0
            if last:
                for key, value in list(_servers.items()):
                    if value is server:
                        del _servers[key]
        if last:
            server.shutdown()
            server.server_close()
