"""``msight demo``: camera frames and point clouds through a processing node to sinks.

The pipeline is made of the library's own nodes, each with its own backend from
``get_pubsub()`` and running on its own thread::

    camera (SourceNode, ImageData)  --camera-->  detector (DataProcessingNode)
                                                      --detections-->  recorder (SinkNode)
    lidar  (SourceNode, PointCloudData) --lidar-->  lidar_sink (SinkNode)

Every message carries a sequence number; the receivers count gaps (drops) and
the latency from the frame's capture timestamp. The main thread draws the table.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from ..data import Data, DetectionResult, ImageData, PointCloudData, SensorData
from ..errors import BrokerUnavailableError
from ..nodes import DataProcessingNode, NodeConfig, NodeStatus, SinkNode, SourceNode
from .common import CliError, Target, fmt_bytes, fmt_ms, render_table, say

__all__ = ["DemoOptions", "run_demo"]

_MAX_SAMPLES = 200_000
_READY_TIMEOUT = 60.0
_DRAIN_TIMEOUT = 10.0


@dataclass
class DemoOptions:
    duration: float = 10.0
    rate: float = 10.0
    width: int = 1920
    height: int = 1080
    points: int = 100_000
    refresh: float = 1.0
    json_path: str | None = None
    metrics_port: int | None = None  # every node of the demo serves /metrics on it


class Meter:
    """Per-topic counters fed by a receiving node (any thread) and read by the table."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._lock = threading.Lock()
        self.received = 0
        self.bytes = 0
        self.gaps = 0
        self._last_seq: int | None = None
        self._first_seq = 0
        self._window: list[float] = []
        self._all: list[float] = []
        self._mark = (time.monotonic(), 0, 0)

    def record(self, nbytes: int, latency: float, seq: Any) -> None:
        with self._lock:
            self.received += 1
            self.bytes += nbytes
            self._window.append(latency)
            if len(self._all) < _MAX_SAMPLES:
                self._all.append(latency)
            if isinstance(seq, int):
                # Missing so far: numbers below the highest seen that have not arrived.
                # Late (reordered) messages, as on multi-partition Kafka topics, are
                # counted while they are missing and no longer once they arrive.
                if self._last_seq is None:
                    self._first_seq = seq
                    self._last_seq = seq
                elif seq > self._last_seq:
                    self._last_seq = seq
                self.gaps = max(self._last_seq - self._first_seq + 1 - self.received, 0)

    def window(self) -> tuple[float, float, float | None, float | None]:
        """msgs/s, MB/s, p50 and p99 latency since the previous call."""
        now = time.monotonic()
        with self._lock:
            then, count, nbytes = self._mark
            lat, self._window = self._window, []
            self._mark = (now, self.received, self.bytes)
            msgs, size = self.received - count, self.bytes - nbytes
        elapsed = max(now - then, 1e-6)
        p50, p99 = _percentiles(lat)
        return msgs / elapsed, size / elapsed / 1e6, p50, p99

    def latencies(self) -> list[float]:
        with self._lock:
            return list(self._all)


def _percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    arr = np.asarray(values)
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def _seq(data: Data) -> Any:
    return data.metadata.get("seq") if isinstance(data, SensorData) else None


def _size(data: Data) -> int:
    if isinstance(data, ImageData) and isinstance(data.image, np.ndarray):
        return int(data.image.nbytes)
    if isinstance(data, PointCloudData):
        return int(data.points.nbytes)
    if isinstance(data, DetectionResult):
        return int(data.boxes.nbytes + data.scores.nbytes + data.classes.nbytes)
    return 0


class Camera(SourceNode):
    """Synthetic camera: a noise frame with the frame number stamped in its corner."""

    def __init__(self, configs: NodeConfig, width: int, height: int, **kwargs: Any) -> None:
        super().__init__(configs, **kwargs)
        rng = np.random.default_rng(7)
        self.frame = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        self.seq = 0

    def get_data(self) -> ImageData:
        self.seq += 1
        self.frame[:8, :8, :] = self.seq % 256
        # publish() serializes at once, so reusing the array for the next frame is safe.
        return ImageData(image=self.frame, sensor_name="camera1", metadata={"seq": self.seq})


class Lidar(SourceNode):
    """Synthetic lidar: a fixed cloud of ``(N, 4)`` float32 points, slowly rotating."""

    def __init__(self, configs: NodeConfig, points: int, **kwargs: Any) -> None:
        super().__init__(configs, **kwargs)
        rng = np.random.default_rng(11)
        self.points = rng.normal(0, 20, size=(points, 4)).astype(np.float32)
        self.seq = 0

    def get_data(self) -> PointCloudData:
        self.seq += 1
        self.points[0, 3] = float(self.seq)
        return PointCloudData(points=self.points, sensor_name="lidar1", metadata={"seq": self.seq})


class Detector(DataProcessingNode):
    """The processing node: finds the brightest cells of each frame as "detections"."""

    def __init__(self, configs: NodeConfig, meter: Meter, **kwargs: Any) -> None:
        super().__init__(configs, **kwargs)
        self.meter = meter
        self.seq = 0

    def process(self, data: Data) -> DetectionResult | None:
        self.meter.record(_size(data), data.age(), _seq(data))  # type: ignore[attr-defined]
        if not isinstance(data, ImageData) or not isinstance(data.image, np.ndarray):
            return None
        step = 40
        cells = data.image[::step, ::step, 0].astype(np.float32)
        best = np.argsort(cells, axis=None)[-5:]
        rows, cols = np.unravel_index(best, cells.shape)
        boxes = np.stack([cols * step, rows * step, cols * step + step, rows * step + step], 1)
        self.seq += 1
        return DetectionResult(
            boxes=boxes.astype(np.float32),
            classes=np.zeros(len(best), np.int64),
            scores=(cells[rows, cols] / 255.0).astype(np.float32),
            class_names=["bright"],
            source_frame_id=data.frame_id,
            sensor_name=data.sensor_name,
            capture_timestamp=data.capture_timestamp,
            metadata={"seq": self.seq},
        )


class Recorder(SinkNode):
    """A sink that only measures what reaches it."""

    def __init__(self, configs: NodeConfig, meter: Meter, **kwargs: Any) -> None:
        super().__init__(configs, **kwargs)
        self.meter = meter

    def on_message(self, data: Data) -> None:
        self.meter.record(_size(data), data.age(), _seq(data))  # type: ignore[attr-defined]


@dataclass
class _Running:
    node: Any
    thread: threading.Thread
    error: list[BaseException] = field(default_factory=list)


def _start(node: Any) -> _Running:
    error: list[BaseException] = []

    def run() -> None:
        try:
            node.spin(handle_signals=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            error.append(exc)

    thread = threading.Thread(target=run, name=f"msight-demo-{node.name}", daemon=True)
    running = _Running(node, thread, error)
    thread.start()
    return running


def _check(nodes: list[_Running]) -> None:
    for running in nodes:
        if running.error:
            exc = running.error[0]
            raise CliError(f"node {running.node.name} failed: {type(exc).__name__}: {exc}")


def _stop(nodes: list[_Running], timeout: float = 15.0) -> None:
    for running in nodes:
        running.node.stop()
    deadline = time.monotonic() + timeout
    for running in nodes:
        running.thread.join(max(0.1, deadline - time.monotonic()))


def run_demo(target: Target, opts: DemoOptions, out: TextIO) -> int:
    """Run the pipeline on ``target`` for ``opts.duration`` seconds; return the exit code.

    Blocks. ``KeyboardInterrupt`` in the caller's thread ends the run early and
    cleanly (the summary is still printed).

    Raises:
        CliError: a node failed or the receivers did not get ready in time.
        MsightError: the backend could not be built or reached.
    """
    if opts.duration <= 0 or opts.rate <= 0:
        raise CliError("--duration and --rate must be positive")
    if opts.width < 8 or opts.height < 8 or opts.points < 1:
        raise CliError("frames must be at least 8x8 pixels and clouds at least 1 point")
    run_id = uuid.uuid4().hex[:8]
    topics = {name: f"msight.demo.{run_id}.{name}" for name in ("camera", "lidar", "detections")}
    meters = {
        "camera": Meter(f"camera ({opts.width}x{opts.height}x3)"),
        "lidar": Meter(f"lidar ({opts.points} pts)"),
        "detections": Meter("detections"),
    }

    def cfg(name: str, **kw: Any) -> NodeConfig:
        return NodeConfig(
            name=name, register_topics=False, stats_interval=0, logging_level="WARNING",
            metrics_port=opts.metrics_port, **kw,
        )  # fmt: skip

    env = target.env
    receivers: list[_Running] = []
    sources: list[_Running] = []
    built: list[Any] = []
    interrupted = False
    started = time.monotonic()
    try:
        detector = Detector(
            cfg("detector", subscribe_topic_name=topics["camera"],
                subscribe_topic_data_type=ImageData, publish_topic_name=topics["detections"]),
            meters["camera"], env=env,
        )  # fmt: skip
        built.append(detector)
        recorder = Recorder(
            cfg("recorder", subscribe_topic_name=topics["detections"]),
            meters["detections"], env=env,
        )  # fmt: skip
        built.append(recorder)
        lidar_sink = Recorder(
            cfg("lidar_sink", subscribe_topic_name=topics["lidar"]), meters["lidar"], env=env
        )
        built.append(lidar_sink)
        camera = Camera(
            cfg("camera", publish_topic_name=topics["camera"], rate=opts.rate),
            opts.width, opts.height, env=env,
        )  # fmt: skip
        built.append(camera)
        lidar = Lidar(
            cfg("lidar", publish_topic_name=topics["lidar"], rate=opts.rate), opts.points, env=env
        )
        built.append(lidar)

        say(f"msight demo on {target.description}; topics msight.demo.{run_id}.*")
        receivers = [_start(n) for n in (detector, recorder, lidar_sink)]
        try:
            _wait_ready(receivers)
        except KeyboardInterrupt:
            say("interrupted before the sources started")
            return 0
        if detector.metrics_url is not None:
            say(f"metrics of all nodes on {detector.metrics_url}")
        sources = [_start(camera), _start(lidar)]
        started = time.monotonic()
        table = _Table(out, target, opts, meters)
        try:
            while True:
                elapsed = time.monotonic() - started
                if elapsed >= opts.duration:
                    break
                time.sleep(min(opts.refresh, opts.duration - elapsed))
                _check(sources + receivers)
                table.draw(time.monotonic() - started)
        except KeyboardInterrupt:
            interrupted = True
            table.finish()
            say("interrupted: stopping the sources and draining ...")
        else:
            table.finish()
        ran = time.monotonic() - started
        _stop(sources)

        def published_now() -> dict[str, int]:
            return {
                "camera": camera.stats.snapshot()["published"],
                "lidar": lidar.stats.snapshot()["published"],
                "detections": detector.stats.snapshot()["published"],
            }

        _drain(published_now, meters)
        _stop(receivers)
        published = published_now()
        _check(sources + receivers)
    finally:
        _stop(sources + receivers, timeout=5.0)
        for node in built:
            node.close()
    summary = _summary(target, opts, meters, published, ran, interrupted)
    _print_summary(out, summary, meters)
    if opts.json_path:
        with open(opts.json_path, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
    return 0


def _wait_ready(receivers: list[_Running]) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT
    while any(r.node.status is not NodeStatus.RUNNING for r in receivers):
        _check(receivers)
        if time.monotonic() > deadline:
            raise BrokerUnavailableError(
                f"the demo's subscribers were not ready within {_READY_TIMEOUT:g}s"
            )
        time.sleep(0.02)


def _drain(published: Callable[[], dict[str, int]], meters: dict[str, Meter]) -> None:
    """Wait (bounded) until every published message reached its receiver."""
    deadline = time.monotonic() + _DRAIN_TIMEOUT
    while time.monotonic() < deadline:
        if all(meters[t].received >= n for t, n in published().items()):
            return
        time.sleep(0.05)


class _Table:
    """The live table: redrawn in place on a terminal, one line per refresh otherwise."""

    def __init__(
        self, out: TextIO, target: Target, opts: DemoOptions, meters: dict[str, Meter]
    ) -> None:
        self.out = out
        self.target = target
        self.opts = opts
        self.meters = meters
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.lines = 0

    def draw(self, elapsed: float) -> None:
        rows = []
        for meter in self.meters.values():
            rate, mbps, p50, p99 = meter.window()
            rows.append((meter, rate, mbps, p50, p99))
        if self.tty:
            head = (
                f"msight demo on {self.target.description} - "
                f"{elapsed:4.1f}s / {self.opts.duration:g}s  (Ctrl-C to stop)"
            )
            table = render_table(
                ["topic", "msgs/s", "MB/s", "p50 ms", "p99 ms", "drops"],
                [(m.label, f"{r:.1f}", _mb(b), fmt_ms(p5), fmt_ms(p9), m.gaps)
                 for m, r, b, p5, p9 in rows],
            )  # fmt: skip
            text = head + "\n" + table
            if self.lines:
                self.out.write(f"\x1b[{self.lines}F\x1b[J")
            self.out.write(text + "\n")
            self.lines = text.count("\n") + 1
        else:
            parts = [
                f"{m.label.split(' ')[0]} {r:.1f}/s {_mb(b)} MB/s p50 {fmt_ms(p5)} "
                f"p99 {fmt_ms(p9)} ms drops {m.gaps}"
                for m, r, b, p5, p9 in rows
            ]
            self.out.write(f"[{elapsed:5.1f}s] " + " | ".join(parts) + "\n")
        self.out.flush()

    def finish(self) -> None:
        self.lines = 0


def _summary(
    target: Target,
    opts: DemoOptions,
    meters: dict[str, Meter],
    published: dict[str, int],
    ran: float,
    interrupted: bool,
) -> dict[str, Any]:
    topics: dict[str, Any] = {}
    for name, meter in meters.items():
        lat = meter.latencies()
        p50, p99 = _percentiles(lat)
        sent = published.get(name, 0)
        topics[name] = {
            "published": sent,
            "received": meter.received,
            "dropped": max(sent - meter.received, 0),
            "gaps": meter.gaps,
            "msgs_per_s": meter.received / ran if ran > 0 else 0.0,
            "mb_per_s": meter.bytes / ran / 1e6 if ran > 0 else 0.0,
            "p50_ms": None if p50 is None else p50 * 1e3,
            "p99_ms": None if p99 is None else p99 * 1e3,
            "max_ms": max(lat) * 1e3 if lat else None,
        }
    return {
        "backend": target.backend,
        "broker": target.description,
        "embedded": target.embedded is not None,
        "duration_s": ran,
        "interrupted": interrupted,
        "rate_hz": opts.rate,
        "frame": [opts.height, opts.width, 3],
        "points": opts.points,
        "topics": topics,
    }


def _print_summary(out: TextIO, summary: dict[str, Any], meters: dict[str, Meter]) -> None:
    rows = []
    total_bytes = 0.0
    for name, t in summary["topics"].items():
        total_bytes += t["mb_per_s"]
        rows.append((
            meters[name].label, t["published"], t["received"], f"{t['msgs_per_s']:.1f}",
            _mb(t["mb_per_s"]), _ms(t["p50_ms"]), _ms(t["p99_ms"]), _ms(t["max_ms"]),
            t["dropped"],
        ))  # fmt: skip
    out.write(
        f"\nsummary: {summary['broker']}, "
        f"{summary['duration_s']:.1f}s{' (interrupted)' if summary['interrupted'] else ''}\n"
    )
    headers = ["topic", "sent", "received", "msgs/s", "MB/s", "p50 ms", "p99 ms", "max ms"]
    out.write(render_table([*headers, "dropped"], rows) + "\n")
    dropped = sum(t["dropped"] for t in summary["topics"].values())
    frame_size = fmt_bytes(summary["frame"][0] * summary["frame"][1] * 3)
    verdict = "no message lost" if dropped == 0 else f"{dropped} message(s) lost"
    out.write(f"{total_bytes:.1f} MB/s in total with {frame_size} frames; {verdict}\n")
    out.flush()


def _mb(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else fmt_ms(value / 1e3)


def parse_frame(text: str) -> tuple[int, int]:
    """``"1920x1080"`` -> ``(1920, 1080)``.

    Raises:
        CliError: malformed.
    """
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise CliError(f"--frame must look like 1920x1080, got {text!r}", code=2) from None
    return width, height
