"""Node base classes on the in-memory backend: loops, groups, errors, signals, stats."""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from msight_core.data import Data, DetectionResult, ImageData, PointCloudData, SensorData
from msight_core.errors import ConfigError
from msight_core.nodes import (
    DataProcessingNode,
    ErrorPolicy,
    NodeConfig,
    NodeStatus,
    SinkNode,
    SourceNode,
)
from msight_core.pubsub import MemoryPubSub, PubSubBackend
from msight_core.pubsub.memory import MemoryBroker

TIMEOUT = 20.0


class Camera(SourceNode):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.count = 0

    def get_data(self) -> ImageData:
        self.count += 1
        return ImageData(np.full((4, 4), self.count % 255, np.uint8), frame_id=self.count)


class Detector(DataProcessingNode):
    def __init__(self, *args: Any, fail_on: set[int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ready = threading.Event()
        self.seen: list[int] = []
        self.fail_on = fail_on or set()
        self.errors: list[Exception] = []

    def on_before_spin(self) -> None:
        self.ready.set()

    def on_error(self, exc: Exception) -> None:
        self.errors.append(exc)

    def process(self, data: Data) -> DetectionResult:
        assert isinstance(data, ImageData)
        if data.frame_id in self.fail_on:
            raise RuntimeError(f"cannot process frame {data.frame_id}")
        self.seen.append(data.frame_id)
        return DetectionResult(
            source_frame_id=data.frame_id,
            capture_timestamp=data.capture_timestamp,
            metadata={"by": self.name},
        )


class Collector(SinkNode):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ready = threading.Event()
        self.items: list[Data] = []

    def on_before_spin(self) -> None:
        self.ready.set()

    def on_message(self, data: Data) -> None:
        self.items.append(data)


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


def mem(broker: MemoryBroker, group_id: str | None = None) -> MemoryPubSub:
    return MemoryPubSub(group_id=group_id, broker=broker)


def spin_in_thread(node: Any, **kwargs: Any) -> threading.Thread:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            node.spin(handle_signals=False, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.errors = errors  # type: ignore[attr-defined]
    t.start()
    return t


def wait_for(predicate: Any, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


@pytest.fixture
def threads() -> Iterator[list[tuple[Any, threading.Thread]]]:
    started: list[tuple[Any, threading.Thread]] = []
    yield started
    for node, _ in started:
        node.stop()
    for _, t in started:
        t.join(TIMEOUT)
        assert not t.is_alive()


def cfg(name: str, **kw: Any) -> NodeConfig:
    return NodeConfig(name=name, stats_interval=0, receive_timeout=0.05, **kw)


def test_pipeline_with_a_group_of_processors(broker: MemoryBroker, threads: list) -> None:
    sink = Collector(cfg("sink", subscribe_topic_name="dets"), mem(broker))
    workers = [
        Detector(
            cfg(
                f"det{i}",
                subscribe_topic_name="frames",
                subscribe_topic_data_type=ImageData,
                publish_topic_name="dets",
                publish_topic_data_type=DetectionResult,
                group_id="detectors",
            ),
            mem(broker, "detectors"),
        )
        for i in range(2)
    ]
    for node in (sink, *workers):
        threads.append((node, spin_in_thread(node)))
        assert node.ready.wait(TIMEOUT)
    camera = Camera(
        cfg("cam", publish_topic_name="frames", rate=500, sensor_name="cam1"), mem(broker)
    )
    camera.spin(life_span=60, handle_signals=False)
    assert camera.pubsub.closed and camera.stats.snapshot()["published"] == 60

    wait_for(lambda: len(sink.items) == 60)
    ids = sorted(d.source_frame_id for d in sink.items)
    assert ids == list(range(1, 61))  # every frame once
    assert all(w.seen for w in workers)  # both took some
    assert sum(len(w.seen) for w in workers) == 60
    assert {d.metadata["by"] for d in sink.items} == {"det0", "det1"}
    snap = sink.stats.snapshot()
    assert snap["received"] == 60 and snap["latency_avg"] is not None
    assert snap["latency_avg"] >= 0
    assert all(isinstance(d, DetectionResult) for d in sink.items)


def test_source_rate_life_span_gap_and_stamping(broker: MemoryBroker, threads: list) -> None:
    sink = Collector(cfg("sink", subscribe_topic_name="frames"), mem(broker))
    threads.append((sink, spin_in_thread(sink)))
    assert sink.ready.wait(TIMEOUT)
    camera = Camera(
        cfg(
            "cam",
            publish_topic_name="frames",
            rate=50,
            gap=1,
            sensor_name="cam7",
            device_name="edge1",
        ),
        mem(broker),
    )
    started = time.monotonic()
    camera.spin(life_span=10, handle_signals=False)
    elapsed = time.monotonic() - started
    assert 0.15 < elapsed < 3.0  # 10 frames at 50 Hz
    wait_for(lambda: len(sink.items) == 5)
    assert [d.frame_id for d in sink.items] == [2, 4, 6, 8, 10]
    assert {(d.sensor_name, d.device_name) for d in sink.items} == {("cam7", "edge1")}
    assert camera.stats.snapshot()["skipped"] == 5


def test_continue_policy_logs_counts_and_goes_on(
    broker: MemoryBroker, threads: list, caplog: pytest.LogCaptureFixture
) -> None:
    det = Detector(
        cfg(
            "det", subscribe_topic_name="frames", publish_topic_name="d", action_on_error="continue"
        ),
        mem(broker),
        fail_on={2, 4},
    )
    threads.append((det, spin_in_thread(det)))
    assert det.ready.wait(TIMEOUT)
    pub = mem(broker)
    for i in range(1, 6):
        pub.publish("frames", ImageData(np.zeros((2, 2), np.uint8), frame_id=i).serialize())
    pub.publish("frames", b"garbage")
    pub.publish("frames", SensorData().serialize())  # wrong type for process()
    wait_for(lambda: det.stats.snapshot()["received"] == 7)
    wait_for(lambda: det.stats.snapshot()["errors"] == 4)
    assert det.seen == [1, 3, 5]
    assert len(det.errors) == 4
    assert "cannot process frame 2" in caplog.text
    assert det.status is NodeStatus.RUNNING


@dataclass(eq=False)
class Fragile(SensorData, tag="test_nodes.fragile"):
    """A type whose latency cannot be computed: stands for any failure after process()."""

    def age(self, now: float | None = None) -> float:
        raise RuntimeError("no clock for this frame")


def test_a_hostile_message_costs_that_message_only(
    broker: MemoryBroker, threads: list, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 15 row 3: decode, latency and statistics are under the error policy."""
    from msight_core.data._codec import pack

    sink = Collector(
        cfg("sink", subscribe_topic_name="in", action_on_error="continue"), mem(broker)
    )
    threads.append((sink, spin_in_thread(sink)))
    assert sink.ready.wait(TIMEOUT)
    pub = mem(broker)
    evil = pack("SensorData", {"sensor_name": "cam", "capture_timestamp": "evil"}, [])
    pub.publish("in", evil)  # used to pass decoding, then stop the node in age()
    pub.publish("in", Fragile(sensor_name="cam").serialize())  # age() raises after process()
    pub.publish("in", SensorData(sensor_name="nan", capture_timestamp=float("nan")).serialize())
    pub.publish("in", SensorData(sensor_name="good").serialize())
    wait_for(lambda: sink.stats.snapshot()["received"] == 4)
    wait_for(lambda: [d.sensor_name for d in sink.items][-1:] == ["good"])
    snap = sink.stats.snapshot()
    assert snap["errors"] == 2 and sink.status is NodeStatus.RUNNING
    assert "capture_timestamp is a str" in caplog.text
    # A NaN capture time is handled but kept out of the latency figures.
    assert snap["latency_avg_total"] is not None and snap["latency_avg_total"] >= 0


def test_undecodable_message_never_stops_a_node_even_with_stop_policy(
    broker: MemoryBroker, threads: list, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer's bytes that do not decode cost that message only, whatever the policy:
    "stop" is for this node's own errors, not for what anyone can publish."""
    from msight_core.data._codec import pack

    sink = Collector(cfg("sink", subscribe_topic_name="in"), mem(broker))
    assert sink.error_policy is ErrorPolicy.STOP
    threads.append((sink, spin_in_thread(sink)))
    assert sink.ready.wait(TIMEOUT)
    pub = mem(broker)
    pub.publish("in", b"not a message at all")
    pub.publish("in", pack("SensorData", {"sensor_name": "cam", "capture_timestamp": "x"}, []))
    pub.publish("in", SensorData(sensor_name="good").serialize())
    wait_for(lambda: [d.sensor_name for d in sink.items] == ["good"])
    assert sink.status is NodeStatus.RUNNING
    assert sink.stats.snapshot()["errors"] == 2
    assert "does not decode" in caplog.text


def test_stop_policy_shuts_down_and_reraises(broker: MemoryBroker) -> None:
    det = Detector(
        cfg("det", subscribe_topic_name="frames", publish_topic_name="d"), mem(broker), fail_on={3}
    )
    assert det.error_policy is ErrorPolicy.STOP
    t = spin_in_thread(det)
    assert det.ready.wait(TIMEOUT)
    pub = mem(broker)
    for i in range(1, 6):
        pub.publish("frames", ImageData(np.zeros((2, 2), np.uint8), frame_id=i).serialize())
    t.join(TIMEOUT)
    assert not t.is_alive()
    assert len(t.errors) == 1 and "frame 3" in str(t.errors[0])  # type: ignore[attr-defined]
    assert det.seen == [1, 2]
    assert det.pubsub.closed and det.status is NodeStatus.ERROR


def test_wrong_subscribed_type_is_an_error(broker: MemoryBroker, threads: list) -> None:
    class Lidar(SinkNode):
        def on_message(self, data: Data) -> None:
            self.got = data

    sink = Lidar(
        cfg(
            "lidar",
            subscribe_topic_name="points",
            subscribe_topic_data_type="PointCloudData",
            action_on_error="continue",
        ),
        mem(broker),
    )
    assert sink.subscribe_topic_data_type is PointCloudData
    threads.append((sink, spin_in_thread(sink)))
    wait_for(lambda: "points" in sink.pubsub.topics)
    pub = mem(broker)
    pub.publish("points", ImageData(np.zeros((2, 2), np.uint8)).serialize())
    pub.publish("points", PointCloudData(np.zeros((3, 4), np.float32)).serialize())
    wait_for(lambda: sink.stats.snapshot()["received"] == 2)
    wait_for(lambda: hasattr(sink, "got"))
    assert sink.stats.snapshot()["errors"] == 1 and isinstance(sink.got, PointCloudData)


def test_sigterm_stops_cleanly_in_the_main_thread(broker: MemoryBroker) -> None:
    assert threading.current_thread() is threading.main_thread()
    det = Detector(cfg("det", subscribe_topic_name="frames", publish_topic_name="out"), mem(broker))
    before = signal.getsignal(signal.SIGTERM)
    out = mem(broker)
    out.subscribe("out")
    pub = mem(broker)

    def feed_then_signal() -> None:
        det.ready.wait(TIMEOUT)
        for i in range(1, 4):
            pub.publish("frames", ImageData(np.zeros((2, 2), np.uint8), frame_id=i).serialize())
        wait_for(lambda: len(det.seen) == 3)
        os.kill(os.getpid(), signal.SIGTERM)

    helper = threading.Thread(target=feed_then_signal, daemon=True)
    helper.start()
    det.spin()  # returns normally on SIGTERM
    helper.join(TIMEOUT)
    assert det.status is NodeStatus.STOPPED and det.pubsub.closed
    assert signal.getsignal(signal.SIGTERM) is before
    got = [out.receive(1.0) for _ in range(3)]
    assert [DetectionResult.deserialize(m.data).source_frame_id for m in got] == [1, 2, 3]


def test_stats_summary_is_logged(broker: MemoryBroker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    camera = Camera(
        NodeConfig(name="cam", publish_topic_name="frames", rate=100, stats_interval=0.05),
        mem(broker),
    )
    camera.spin(life_span=20, handle_signals=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "msight_core.nodes.cam"]
    summaries = [line for line in lines if "proc avg" in line]
    assert len(summaries) >= 2
    assert "out" in summaries[-1] and "totals" in summaries[-1]


def test_config_merging_and_validation(broker: MemoryBroker) -> None:
    class Slow(Camera):
        default_configs = NodeConfig(rate=5, action_on_error="continue")

    node = Slow(NodeConfig(name="s", publish_topic_name="t", rate=7), mem(broker))
    assert node.rate == 7 and node.error_policy is ErrorPolicy.CONTINUE
    assert node.configs.receive_timeout == 0.2  # from Node's defaults
    node.close()
    with pytest.raises(ConfigError, match="name"):
        Camera(NodeConfig(publish_topic_name="t"), mem(broker))
    with pytest.raises(ConfigError, match="action_on_error"):
        Camera(NodeConfig(name="c", publish_topic_name="t", action_on_error="retry"), mem(broker))
    with pytest.raises(ConfigError, match="publish_topic_name"):
        Camera(NodeConfig(name="c"), mem(broker))
    with pytest.raises(ConfigError, match="subscribe_topic_name"):
        Collector(NodeConfig(name="c"), mem(broker))
    with pytest.raises(ConfigError, match="registered tag"):
        Collector(
            NodeConfig(name="c", subscribe_topic_name="t", subscribe_topic_data_type="Nope"),
            mem(broker),
        )
    with pytest.raises(ConfigError, match="logging level"):
        Camera(NodeConfig(name="c", publish_topic_name="t", logging_level="LOUD"), mem(broker))
    assert "name='c'" in repr(NodeConfig(name="c"))


def test_backend_from_environment_gets_the_group() -> None:
    node = Collector(
        NodeConfig(name="sink", subscribe_topic_name="t", group_id="g1"),
        env={"MSIGHT_PUBSUB_BACKEND": "memory"},
    )
    assert isinstance(node.pubsub, MemoryPubSub) and node.pubsub.group_id == "g1"
    assert node.subscribe_topic.name == "t" and node.subscribe_topic_data_type is Data
    node.close()
    assert node.pubsub.closed


class SeedStyleBackend(PubSubBackend):
    """A user backend written as in the seed: subscribe/publish/listen only."""

    def __init__(self) -> None:
        self.q: queue.Queue[bytes | None] = queue.Queue()
        self.closed = False

    def subscribe(self, topic: Any) -> None:
        self.topic = topic

    def publish(self, topic: Any, serialized_data: bytes) -> None:
        self.q.put(serialized_data)

    def listen(self) -> Iterator[bytes]:
        while (item := self.q.get()) is not None:
            yield item

    def close(self) -> None:
        self.closed = True
        self.q.put(None)


def test_backend_without_receive_still_stops() -> None:
    backend = SeedStyleBackend()
    sink = Collector(cfg("sink", subscribe_topic_name="t"), backend)
    t = spin_in_thread(sink)
    assert sink.ready.wait(TIMEOUT)
    backend.publish("t", SensorData(sensor_name="a").serialize())
    wait_for(lambda: len(sink.items) == 1)
    sink.stop()
    t.join(TIMEOUT)
    assert not t.is_alive() and backend.closed and not t.errors  # type: ignore[attr-defined]
