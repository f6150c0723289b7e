"""The ``/metrics`` endpoint of running nodes on real brokers, parsed by prometheus_client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from msight_core.data import BytesData, DetectionResult
from msight_core.errors import ConfigError, MissingDependencyError
from msight_core.nodes import DataProcessingNode, NodeConfig, SourceNode
from msight_core.pubsub import get_pubsub
from msight_core.testing.brokers import free_port

KAFKA_TEST_ENV = {"MSIGHT_KAFKA_CONSUMER_SESSION_TIMEOUT_MS": "6000"}
COUNT = 50


class Camera(SourceNode):
    def get_data(self) -> BytesData:
        return BytesData(data=b"f" * 1024, sensor_name="cam")


class Detector(DataProcessingNode):
    def process(self, data: Any) -> DetectionResult:
        return DetectionResult(sensor_name="cam", capture_timestamp=data.capture_timestamp)


def _env(request: pytest.FixtureRequest, broker: str) -> dict[str, str]:
    server: Any = request.getfixturevalue(f"{broker}_server")
    return {**server.env(), **(KAFKA_TEST_ENV if broker == "kafka" else {})}


def _cfg(name: str, **kw: Any) -> NodeConfig:
    return NodeConfig(name=name, register_topics=False, stats_interval=0, **kw)


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``{sample name: {sorted labels: value}}`` of one scrape, parsed by prometheus_client."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(samples: dict[str, Any], name: str, **labels: str) -> float:
    matches = [v for key, v in samples.get(name, {}).items() if labels.items() <= dict(key).items()]
    assert len(matches) == 1, (name, labels, samples.get(name))
    return matches[0]


class Running:
    """A node spinning on a thread."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.node.spin(handle_signals=False)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def stop(self) -> None:
        self.node.stop()
        self.thread.join(30)
        assert self.error is None, self.error


@pytest.fixture
def running() -> Iterator[list[Running]]:
    nodes: list[Running] = []
    yield nodes
    for item in nodes:
        item.node.stop()
    for item in nodes:
        item.thread.join(30)
        item.node.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("broker", ["redis", "nats", "kafka"])
def test_a_running_node_serves_its_metrics(
    broker: str, request: pytest.FixtureRequest, unique_topic: str, running: list[Running]
) -> None:
    env = _env(request, broker)
    frames, results = unique_topic + ".frames", unique_topic + ".det"
    detector = Detector(
        _cfg("detector", subscribe_topic_name=frames, publish_topic_name=results, metrics_port=0),
        env=env,
    )
    running.append(Running(detector))
    deadline = time.monotonic() + 60
    while detector.metrics_url is None or detector.status.value != "running":
        assert time.monotonic() < deadline, "the node did not start"
        time.sleep(0.05)
    with get_pubsub(env=env) as raw:
        raw.publish(frames, b"not a message")  # counted as dropped: undecodable
        raw.flush()
    camera = Camera(_cfg("camera", publish_topic_name=frames, rate=200), env=env)
    camera.spin(life_span=COUNT, handle_signals=False)
    while detector.stats.snapshot()["processed"] < COUNT and time.monotonic() < deadline:
        time.sleep(0.05)

    samples = scrape(detector.metrics_url)
    labels = {"node": "detector", "backend": broker}
    assert value(samples, "msight_messages_received_total", topic=frames, **labels) == COUNT + 1
    received_bytes = value(samples, "msight_bytes_received_total", topic=frames, **labels)
    assert received_bytes > COUNT * 1024
    assert value(samples, "msight_messages_published_total", topic=results, **labels) == COUNT
    assert value(samples, "msight_bytes_published_total", topic=results, **labels) > 0
    dropped = "msight_messages_dropped_total"
    assert value(samples, dropped, topic=frames, reason="undecodable", **labels) == 1
    assert value(samples, dropped, topic=frames, reason="queue_full", **labels) == 0
    assert value(samples, "msight_receive_queue_messages", topic=frames, **labels) >= 0
    assert value(samples, "msight_receive_queue_bytes", topic=frames, **labels) >= 0
    assert value(samples, "msight_node_errors_total", topic=frames, **labels) == 1
    assert value(samples, "msight_processing_seconds_count", topic=frames, **labels) == COUNT
    assert value(samples, "msight_processing_seconds_sum", topic=frames, **labels) > 0
    inf = value(samples, "msight_processing_seconds_bucket", topic=frames, le="+Inf", **labels)
    assert inf == COUNT
    assert value(samples, "msight_latency_seconds_count", topic=frames, **labels) == COUNT
    latency = value(samples, "msight_latency_seconds_sum", topic=frames, **labels) / COUNT
    assert 0 <= latency < 30
    if broker in ("redis", "nats"):
        assert value(samples, "msight_broker_reconnects_total", **labels) == 0
    if broker == "nats":
        assert value(samples, dropped, topic=frames, reason="slow_consumer", **labels) == 0
    assert "process_cpu_seconds_total" in samples
    url = detector.metrics_url
    running.pop().stop()
    detector.close()
    assert detector.metrics_url is None
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=5)


@pytest.mark.timeout(60)
def test_nodes_on_one_port_share_the_endpoint_and_free_it(
    redis_server: Any, unique_topic: str, running: list[Running]
) -> None:
    port = free_port()
    env = {**redis_server.env(), "MSIGHT_METRICS_PORT": str(port)}
    a = Detector(_cfg("a", subscribe_topic_name=unique_topic + ".a"), env=env)  # from the env
    b = Detector(  # from its configuration
        _cfg("b", subscribe_topic_name=unique_topic + ".b", metrics_port=port),
        env=redis_server.env(),
    )
    running.extend([Running(a), Running(b)])
    deadline = time.monotonic() + 30
    while a.metrics_url is None or b.metrics_url is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert a.metrics_url == b.metrics_url == f"http://127.0.0.1:{port}/metrics"
    nodes = {dict(k)["node"] for k in scrape(a.metrics_url)["msight_messages_received_total"]}
    assert nodes == {"a", "b"}
    running[0].stop()
    a.close()
    nodes = {dict(k)["node"] for k in scrape(b.metrics_url)["msight_messages_received_total"]}
    assert nodes == {"b"}
    running[1].stop()
    b.close()
    with socket.socket() as sock:  # nothing listens there any more (TIME_WAIT aside)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))


def test_the_explicit_port_wins_and_bad_ports_are_config_errors(running: list[Running]) -> None:
    taken = free_port()
    env = {"MSIGHT_PUBSUB_BACKEND": "memory", "MSIGHT_METRICS_PORT": str(taken)}
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", taken))  # the environment's port is taken: it must not be used
        node = Detector(
            _cfg("x", subscribe_topic_name="t.x", metrics_port=taken), env=env, metrics_port=0
        )
        running.append(Running(node))
        deadline = time.monotonic() + 30
        while node.metrics_url is None:
            assert time.monotonic() < deadline and running[0].error is None, running[0].error
            time.sleep(0.05)
        assert not node.metrics_url.endswith(f":{taken}/metrics")
    with socket.socket() as busy:  # a port in use: a typed error from spin(), node closed
        busy.bind(("0.0.0.0", taken))
        busy.listen()
        node = Detector(_cfg("y", subscribe_topic_name="t.y"), env=env)
        with pytest.raises(ConfigError, match=f"cannot serve metrics on 0.0.0.0:{taken}"):
            node.spin(handle_signals=False)
        assert node.pubsub.closed
    with pytest.raises(ConfigError):
        Detector(_cfg("x", subscribe_topic_name="t.x"), env=env, metrics_port=70000)
    with pytest.raises(ConfigError):
        Detector(_cfg("x", subscribe_topic_name="t.x"), env={**env, "MSIGHT_METRICS_PORT": "x"})


def test_no_port_no_endpoint_and_no_prometheus_import() -> None:
    script = (
        "import sys\n"
        "import msight_core, msight_core.nodes, msight_core.aio, msight_core.tracing\n"
        "from msight_core.nodes import SinkNode, NodeConfig\n"
        "class S(SinkNode):\n"
        "    def on_message(self, d): pass\n"
        "n = S(NodeConfig(name='s', subscribe_topic_name='t.x', register_topics=False),"
        " env={'MSIGHT_PUBSUB_BACKEND': 'memory'})\n"
        "assert n.metrics_url is None\n"
        "n.close()\n"
        "print('prometheus_client' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_a_port_without_the_extra_says_how_to_install_it() -> None:
    script = (
        "import sys\n"
        "sys.modules['prometheus_client'] = None  # as if not installed\n"
        "from msight_core.errors import MissingDependencyError\n"
        "from msight_core.nodes import SinkNode, NodeConfig\n"
        "class S(SinkNode):\n"
        "    def on_message(self, d): pass\n"
        "try:\n"
        "    S(NodeConfig(name='s', subscribe_topic_name='t.x', register_topics=False),"
        " env={'MSIGHT_PUBSUB_BACKEND': 'memory', 'MSIGHT_METRICS_PORT': '9108'})\n"
        "except MissingDependencyError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "msight-core[metrics]" in out.stdout
    assert MissingDependencyError  # the type the script caught


@pytest.mark.timeout(120)
def test_msight_demo_serves_metrics(redis_server: Any) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSIGHT_")}
    env.update(redis_server.env())
    demo = subprocess.Popen(
        [sys.executable, "-m", "msight_core", "demo", "--no-embedded", "--duration", "8",
         "--frame", "64x48", "--points", "100", "--rate", "20", "--metrics-port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        deadline = time.monotonic() + 60
        samples: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                samples = scrape(url)
                received = samples.get("msight_messages_received_total", {})
                if sum(received.values()) > 10:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        nodes = {dict(k)["node"] for k in samples.get("msight_processing_seconds_count", {})}
        assert {"camera", "lidar", "detector", "recorder", "lidar_sink"} <= nodes, samples.keys()
        out, err = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.communicate()
    assert demo.returncode == 0, err
    assert f"metrics of all nodes on http://127.0.0.1:{port}/metrics" in err + out
