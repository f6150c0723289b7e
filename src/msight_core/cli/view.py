"""``msight view``: a Foxglove WebSocket server showing live topics or a recording.

Open the printed address in Foxglove (app or desktop, "Open connection" ->
Foxglove WebSocket). Each msight topic becomes one or more Foxglove channels:

- ``ImageData``: raw frames as ``foxglove.RawImage`` (mono8, mono16, bgr8,
  bgra8, 32FC1), encoded frames as ``foxglove.CompressedImage``; attached
  detections as ``foxglove.ImageAnnotations`` on ``TOPIC/detections``.
- ``PointCloudData``: ``foxglove.PointCloud`` (one packed field per column).
- ``DetectionResult``: ``foxglove.ImageAnnotations`` (boxes and labels, in
  pixels) on ``TOPIC``, and ``foxglove.SceneUpdate`` boxes on ``TOPIC/scene``
  (the same boxes read as metres on the ground plane, 1.5 m tall).
- anything else: a JSON summary (type, scalar fields, array shapes; text as text).

A message is converted only while a Foxglove client subscribes to its channel.
The server listens on loopback by default (``--host`` to share it).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..errors import DeserializationError, MissingDependencyError
from ..pubsub import get_pubsub
from ..topics import subscription_set
from .common import CliError, refuse_in_process, resolve_target

__all__ = ["FoxgloveBridge", "add_parser", "run_view", "summary"]

logger = logging.getLogger(__name__)

#: (dtype kind + itemsize, channels) -> foxglove RawImage encoding (BGR: msight's order).
RAW_ENCODINGS = {
    ("u1", 1): "mono8", ("u1", 3): "bgr8", ("u1", 4): "bgra8",
    ("u2", 1): "mono16", ("f4", 1): "32FC1",
}  # fmt: skip
#: numpy dtype code -> foxglove PackedElementFieldNumericType member.
_NUMERIC = {
    "u1": "Uint8", "i1": "Int8", "u2": "Uint16", "i2": "Int16",
    "u4": "Uint32", "i4": "Int32", "f4": "Float32", "f8": "Float64",
}  # fmt: skip
_PALETTE = [(0.90, 0.30, 0.24), (0.18, 0.80, 0.44), (0.20, 0.60, 0.86), (0.95, 0.77, 0.06),
            (0.61, 0.35, 0.71), (0.10, 0.74, 0.61), (0.90, 0.49, 0.13)]  # fmt: skip
_MAX_BOXES = 1000
_TEXT = 4096


def _foxglove() -> Any:
    try:
        import foxglove
        import foxglove.channels
        import foxglove.messages
    except ImportError:
        raise MissingDependencyError("foxglove-sdk", "tools") from None
    return foxglove


def summary(value: Any, depth: int = 0) -> Any:
    """A JSON-able summary of a decoded value: scalars kept, arrays as shape and dtype."""
    import dataclasses

    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return value if len(value) <= 200 else value[:200] + "..."
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": len(value)}
    if isinstance(value, np.ndarray):
        if value.size <= 16 and value.dtype.kind in "biuf":
            return value.tolist()
        return {"shape": list(value.shape), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return summary(value.item(), depth)
    if depth >= 4:
        return "..."
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {"type": type(value).__name__}
        for f in dataclasses.fields(value):
            out[f.name] = summary(getattr(value, f.name), depth + 1)
        return out
    if isinstance(value, dict):
        return {str(k)[:100]: summary(v, depth + 1) for k, v in list(value.items())[:50]}
    if isinstance(value, (list, tuple)):
        return [summary(v, depth + 1) for v in value[:50]]
    return repr(value)[:200]


def _payload_summary(data: bytes) -> dict[str, Any]:
    try:
        text = bytes(data[: _TEXT + 1]).decode("utf-8")
    except UnicodeDecodeError:
        return {"bytes": len(data), "hex": bytes(data[:32]).hex(" ")}
    return {"bytes": len(data), "text": text[:_TEXT]}


def _xyxy(boxes: np.ndarray, fmt: str) -> np.ndarray:
    b = boxes.astype(np.float64, copy=False)
    if fmt == "xywh":
        return np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], axis=1)
    if fmt == "cxcywh":
        w, h = b[:, 2] / 2, b[:, 3] / 2
        return np.stack([b[:, 0] - w, b[:, 1] - h, b[:, 0] + w, b[:, 1] + h], axis=1)
    return b


class FoxgloveBridge:
    """Logs msight payloads as Foxglove messages on the channels of one context.

    Not thread-safe: one thread calls :meth:`log`.
    """

    def __init__(self, context: Any) -> None:
        self.fg = _foxglove()
        self.m = self.fg.messages
        self.context = context
        self.channels: dict[str, tuple[str, Any]] = {}  # channel topic -> (kind, channel)
        self.primary: dict[str, str] = {}  # msight topic -> its first kind
        self.failed: set[str] = set()

    def _channel(self, topic: str, kind: str) -> Any:
        name = topic
        first = self.primary.setdefault(topic, kind)
        if first != kind:
            name = f"{topic}/{kind}"
        entry = self.channels.get(name)
        if entry is None:
            ch = self.fg.channels
            make = {
                "raw": ch.RawImageChannel, "compressed": ch.CompressedImageChannel,
                "points": ch.PointCloudChannel, "annotations": ch.ImageAnnotationsChannel,
                "scene": ch.SceneUpdateChannel,
            }.get(kind)  # fmt: skip
            channel = (make(name, context=self.context) if make is not None
                       else self.fg.Channel(name, context=self.context))  # fmt: skip
            entry = self.channels[name] = (kind, channel)
        return entry[1]

    def log(self, topic: str, data: bytes) -> None:
        """Convert one payload of ``topic`` and log it (if a client listens).

        A payload that cannot be shown costs that payload only: it is logged
        (once per topic) and skipped.
        """
        try:
            self._log(topic, data)
        except Exception:
            if topic not in self.failed:
                self.failed.add(topic)
                logger.warning("cannot show a message of %r; skipping such messages", topic,
                               exc_info=True)  # fmt: skip

    def _log(self, topic: str, data: bytes) -> None:
        from ..data import Data, DetectionResult, ImageData, PointCloudData

        try:
            value = Data.deserialize(data)
        except (DeserializationError, TypeError, ValueError):
            value = None
        if isinstance(value, ImageData) and value.image is not None:
            self._image(topic, value)
            if value.detection_results is not None:
                self._annotations(f"{topic}/detections", value.detection_results)
        elif isinstance(value, PointCloudData):
            self._points(topic, value)
        elif isinstance(value, DetectionResult):
            self._annotations(topic, value)
            self._scene(f"{topic}/scene", value)
        else:
            channel = self._channel(topic, "json")
            if channel.has_sinks():
                doc = summary(value) if value is not None else _payload_summary(data)
                channel.log(json.dumps(doc).encode())

    # -- conversions ------------------------------------------------------------------

    def _stamp(self, value: Any) -> Any:
        ts = getattr(value, "capture_timestamp", None)
        if isinstance(ts, (int, float)) and math.isfinite(ts) and 0 <= ts < 2**62:
            return self.m.Timestamp.from_epoch_secs(float(ts))
        return None

    def _image(self, topic: str, value: Any) -> None:
        frame = value.sensor_name or topic
        if isinstance(value.image, bytes):
            channel = self._channel(topic, "compressed")
            if channel.has_sinks():
                channel.log(self.m.CompressedImage(timestamp=self._stamp(value), frame_id=frame,
                                                   data=value.image, format=value.format))  # fmt: skip
            return
        img = value.image
        channels = 1 if img.ndim == 2 else img.shape[2]
        key = (f"{img.dtype.kind}{img.dtype.itemsize}", channels)
        encoding = RAW_ENCODINGS.get(key)
        if encoding is None:
            channel = self._channel(topic, "json")
            if channel.has_sinks():
                channel.log(json.dumps(summary(value)).encode())
            return
        channel = self._channel(topic, "raw")
        if channel.has_sinks():
            height, width = img.shape[:2]
            pixels = np.ascontiguousarray(img, dtype=img.dtype.newbyteorder("<"))
            channel.log(self.m.RawImage(
                timestamp=self._stamp(value), frame_id=frame, width=width, height=height,
                encoding=encoding, step=width * channels * img.dtype.itemsize,
                data=pixels.tobytes(),
            ))  # fmt: skip

    def _points(self, topic: str, value: Any) -> None:
        channel = self._channel(topic, "points")
        if not channel.has_sinks():
            return
        m = self.m
        pts = value.points
        code = f"{pts.dtype.kind}{pts.dtype.itemsize}"
        if code not in _NUMERIC:
            pts, code = pts.astype(np.float32), "f4"
        pts = np.ascontiguousarray(pts, dtype=pts.dtype.newbyteorder("<"))
        size = pts.dtype.itemsize
        kind = getattr(m.PackedElementFieldNumericType, _NUMERIC[code])
        fields = [m.PackedElementField(name=n, offset=i * size, type=kind)
                  for i, n in enumerate(value.field_names)]  # fmt: skip
        channel.log(m.PointCloud(
            timestamp=self._stamp(value), frame_id=value.sensor_name or topic,
            pose=self._pose(0.0, 0.0, 0.0), point_stride=size * pts.shape[1], fields=fields,
            data=pts.tobytes(),
        ))  # fmt: skip

    def _pose(self, x: float, y: float, z: float) -> Any:
        m = self.m
        return m.Pose(position=m.Vector3(x=x, y=y, z=z),
                      orientation=m.Quaternion(x=0.0, y=0.0, z=0.0, w=1.0))  # fmt: skip

    def _color(self, cls: int, alpha: float = 1.0) -> Any:
        r, g, b = _PALETTE[cls % len(_PALETTE)]
        return self.m.Color(r=r, g=g, b=b, a=alpha)

    def _annotations(self, topic: str, det: Any) -> None:
        channel = self._channel(topic, "annotations")
        if not channel.has_sinks():
            return
        m, ts = self.m, self._stamp(det)
        boxes = _xyxy(det.boxes[:_MAX_BOXES], det.box_format)
        labels, scores = det.labels(), det.scores.tolist()
        points, texts = [], []
        for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
            color = self._color(int(det.classes[i]))
            corners = [m.Point2(x=x1, y=y1), m.Point2(x=x2, y=y1), m.Point2(x=x2, y=y2),
                       m.Point2(x=x1, y=y2)]  # fmt: skip
            points.append(m.PointsAnnotation(
                timestamp=ts, type=m.PointsAnnotationType.LineLoop, points=corners,
                outline_color=color, thickness=2.0,
            ))  # fmt: skip
            texts.append(m.TextAnnotation(
                timestamp=ts, position=m.Point2(x=x1, y=y1), text=f"{labels[i]} {scores[i]:.2f}",
                font_size=14.0, text_color=m.Color(r=1.0, g=1.0, b=1.0, a=1.0),
                background_color=color,
            ))  # fmt: skip
        channel.log(m.ImageAnnotations(timestamp=ts, points=points, texts=texts))

    def _scene(self, topic: str, det: Any) -> None:
        channel = self._channel(topic, "scene")
        if not channel.has_sinks():
            return
        m = self.m
        boxes = _xyxy(det.boxes[:_MAX_BOXES], det.box_format)
        cubes = [
            m.CubePrimitive(
                pose=self._pose((x1 + x2) / 2, (y1 + y2) / 2, 0.75),
                size=m.Vector3(x=abs(x2 - x1), y=abs(y2 - y1), z=1.5),
                color=self._color(int(det.classes[i]), 0.6),
            )
            for i, (x1, y1, x2, y2) in enumerate(boxes.tolist())
        ]
        entity = m.SceneEntity(timestamp=self._stamp(det), frame_id=det.sensor_name or topic,
                               id=topic, cubes=cubes)  # fmt: skip
        channel.log(m.SceneUpdate(entities=[entity]))


# --------------------------------------------------------------------------- command


def add_parser(sub: Any, backend_args: Callable[..., None]) -> None:
    """``msight view`` (called by :func:`msight_core.cli.build_parser`)."""
    p = sub.add_parser(
        "view",
        help="show live topics or a recording in Foxglove (WebSocket server)",
        description="Serve live TOPICs, or a recording (--file), to Foxglove over its "
        "WebSocket protocol: images, point clouds, detections as annotations and scene "
        "boxes, everything else as JSON. Prints the address to open. Ctrl-C stops.",
    )
    backend_args(p, embedded=False)
    p.add_argument("topics", nargs="*", metavar="TOPIC",
                   help="live topics or patterns to show (with --file: the recorded ones to show)")  # fmt: skip
    p.add_argument("--file", nargs="+", metavar="FILE", help="play these MCAP files instead")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0 shares it with the network)")  # fmt: skip
    p.add_argument("--port", type=int, default=8765, help="port to listen on (0: a free one)")
    p.add_argument("--rate", type=float, default=1.0, help="speed factor of --file playback")
    p.add_argument("--loop", action="store_true", help="play --file again at the end")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    p.set_defaults(run=run_view)


def run_view(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run ``msight view`` until Ctrl-C, SIGTERM, --duration or the end of --file."""
    topics = subscription_set(args.topics)
    if not topics and not args.file:
        raise CliError("name the live TOPICs to show, or a recording with --file", code=2)
    if not args.rate > 0:
        raise CliError("--rate must be positive", code=2)
    if args.file:
        from .play import recording_infos

        recording_infos([Path(f) for f in args.file])  # a file that is not a recording: now
    fg = _foxglove()
    stop = threading.Event()
    deadline = None if args.duration is None else time.monotonic() + args.duration

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    context = fg.Context()
    try:
        server = fg.start_server(name="msight", host=args.host, port=args.port, context=context)
    except Exception as exc:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        raise CliError(f"cannot serve on {args.host}:{args.port}: {exc}") from exc
    try:
        bridge = FoxgloveBridge(context)
        url = f"ws://{args.host}:{server.port}"
        out.write(f"Foxglove WebSocket server on {url}\n"
                  f"open it in Foxglove: Open connection -> Foxglove WebSocket -> {url}\n"
                  f"  or {server.app_url()}\n")  # fmt: skip
        out.flush()
        if args.file:
            _serve_file(bridge, [Path(f) for f in args.file], topics or None, args, stop,
                        deadline, err)  # fmt: skip
        else:
            _serve_live(bridge, topics, args.backend, stop, deadline, err)
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def _serve_live(bridge: FoxgloveBridge, topics: list[str], backend_name: str | None,
                stop: threading.Event, deadline: float | None, err: TextIO) -> None:  # fmt: skip
    target = resolve_target(backend_name, embedded="never")
    refuse_in_process(target, "view")
    with get_pubsub(env=target.env) as backend:
        for topic in topics:
            backend.subscribe(topic)
        err.write(f"showing {', '.join(topics)} from {target.description or target.backend}; "
                  "Ctrl-C to stop\n")  # fmt: skip
        err.flush()
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            message = backend.receive(0.2)
            if message is not None:
                bridge.log(message.topic, message.data)


def _serve_file(bridge: FoxgloveBridge, files: list[Path], topics: list[str] | None,
                args: argparse.Namespace, stop: threading.Event, deadline: float | None,
                err: TextIO) -> None:  # fmt: skip
    from .play import paced, recorded_messages

    timer = None
    if deadline is not None:
        timer = threading.Timer(max(deadline - time.monotonic(), 0.0), stop.set)
        timer.daemon = True
        timer.start()
    err.write(f"showing {', '.join(map(str, files))} at x{args.rate:g}; Ctrl-C to stop\n")
    err.flush()
    try:
        while not stop.is_set():
            played = 0
            for message in paced(recorded_messages(files, topics), args.rate, stop):
                bridge.log(message.topic, message.data)
                played += 1
            if not args.loop or not played:
                break
        if not stop.is_set():
            err.write("end of the recording: the last messages stay on show; Ctrl-C to stop\n")
            err.flush()
            stop.wait()
    finally:
        if timer is not None:
            timer.cancel()
