"""``msight view`` seen by a Foxglove WebSocket client (issue 20, item 3).

The client speaks the Foxglove WebSocket protocol itself (``websockets``):
serverInfo and advertise (JSON) -> subscribe -> binary message data (opcode 1,
subscription id, log time, payload). foxglove-sdk 0.30 accepts the subprotocol
``foxglove.sdk.v1`` (the successor of ``foxglove.websocket.v1``, same framing);
the client offers both.
"""

from __future__ import annotations

import asyncio
import json
import re
import struct
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from msight_core.data import DetectionResult, ImageData, PointCloudData
from msight_core.pubsub import get_pubsub

pytest.importorskip("foxglove", reason="the tools extra is not installed")
websockets = pytest.importorskip("websockets", reason="the test extra is not installed")

SUBPROTOCOLS = ["foxglove.websocket.v1", "foxglove.sdk.v1"]


def protobuf_fields(buf: bytes) -> dict[int, list[Any]]:
    """Top-level fields of a protobuf message: number -> values (bytes, int)."""
    out: dict[int, list[Any]] = {}
    i = 0

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            byte = buf[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while i < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value: Any = varint()
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n = varint()
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = struct.unpack_from("<I", buf, i)[0], i + 4
        else:
            raise AssertionError(f"wire type {wire}")
        out.setdefault(number, []).append(value)
    return out


async def _first_messages(port: int, topics: set[str], timeout: float) -> dict[str, Any]:
    """Subscribe to ``topics`` once advertised; return topic -> (channel, payload).

    foxglove-sdk 0.30.3 may send a channel's advertisement a moment before it
    accepts subscriptions to it (it answers "Unknown channel ID" with a status
    message): a subscription refused that way is sent again, as a client should.
    """
    url = f"ws://127.0.0.1:{port}"
    async with websockets.connect(url, subprotocols=SUBPROTOCOLS, max_size=None) as ws:
        assert ws.subprotocol in SUBPROTOCOLS
        wanted: dict[int, dict[str, Any]] = {}  # channel id -> channel
        subscribed: dict[int, dict[str, Any]] = {}  # subscription id -> channel
        got: dict[str, Any] = {}
        deadline = time.monotonic() + timeout

        async def subscribe(channels: list[dict[str, Any]]) -> None:
            subs = []
            for channel in channels:
                sub_id = len(subscribed) + 1
                subscribed[sub_id] = channel
                subs.append({"id": sub_id, "channelId": channel["id"]})
            await ws.send(json.dumps({"op": "subscribe", "subscriptions": subs}))

        while set(got) != topics:
            remaining = deadline - time.monotonic()
            try:
                raw = await asyncio.wait_for(ws.recv(), max(remaining, 0.01))
            except TimeoutError:
                raise AssertionError(f"within {timeout}s got only {sorted(got)}") from None
            if isinstance(raw, str):
                doc = json.loads(raw)
                if doc["op"] == "advertise":
                    new = [c for c in doc["channels"] if c["topic"] in topics]
                    wanted.update((c["id"], c) for c in new)
                    if new:
                        await subscribe(new)
                elif doc["op"] == "status" and "nknown channel" in doc.get("message", ""):
                    await asyncio.sleep(0.1)
                    await subscribe([c for c in wanted.values() if c["topic"] not in got])
                continue
            assert raw[0] == 1  # message data
            sub_id, _log_time = struct.unpack_from("<IQ", raw, 1)
            channel = subscribed[sub_id]
            got.setdefault(channel["topic"], (channel, raw[13:]))
        return got


@pytest.mark.timeout(120)
def test_live_topics_reach_a_foxglove_client(
    cli: Any, redis_server: Any, unique_topic: str
) -> None:
    env = cli.env(redis_server.env())
    cam, pts, det, txt = (f"{unique_topic}.{n}" for n in ("cam", "pts", "det", "txt"))
    view = cli.start("view", cam, pts, det, txt, "--port", "0", env=env)
    line = view.wait_line("Foxglove WebSocket server on ws://", timeout=60, stream="out")
    port = int(re.search(r":(\d+)\s*$", line.strip()).group(1))  # type: ignore[union-attr]
    view.wait_line("showing", timeout=60, stream="err")

    image = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    points = np.arange(40, dtype=np.float32).reshape(10, 4)
    boxes = DetectionResult(boxes=[[1, 2, 5, 6], [0, 0, 3, 3]], classes=[0, 1],
                            scores=[0.9, 0.4], class_names=["car", "bike"])  # fmt: skip
    stop = threading.Event()

    def publish() -> None:
        with get_pubsub(env=env) as backend:
            while not stop.is_set():
                backend.publish(cam, ImageData(image=image, sensor_name="cam1").serialize())
                backend.publish(pts, PointCloudData(points=points, sensor_name="lidar").serialize())
                backend.publish(det, boxes.serialize())
                backend.publish(txt, b"hello viewer")
                stop.wait(0.1)

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    try:
        got = asyncio.run(_first_messages(port, {cam, pts, det, txt}, timeout=60))
    finally:
        stop.set()
        publisher.join(10)

    channel, payload = got[cam]
    assert channel["schemaName"] == "foxglove.RawImage" and channel["encoding"] == "protobuf"
    f = protobuf_fields(payload)
    assert (f[2], f[3], f[4], f[5]) == ([8], [6], [b"bgr8"], [8 * 3])
    assert f[6] == [image.tobytes()] and f[7] == [b"cam1"]

    channel, payload = got[pts]
    assert channel["schemaName"] == "foxglove.PointCloud"
    f = protobuf_fields(payload)
    assert f[2] == [b"lidar"] and f[4] == [16] and f[6] == [points.tobytes()]
    names = [protobuf_fields(field)[1][0] for field in f[5]]
    assert names == [b"x", b"y", b"z", b"intensity"]

    channel, payload = got[det]
    assert channel["schemaName"] == "foxglove.ImageAnnotations"
    f = protobuf_fields(payload)
    assert len(f[2]) == 2  # one outline per box
    labels = [protobuf_fields(t)[3][0] for t in f[3]]
    assert labels == [b"car 0.90", b"bike 0.40"]

    channel, payload = got[txt]
    assert channel["encoding"] == "json"
    assert json.loads(payload) == {"bytes": 12, "text": "hello viewer"}
    assert view.interrupt() == 0, view.stderr


@pytest.mark.timeout(120)
def test_a_recording_reaches_a_foxglove_client(cli: Any, tmp_path: Path) -> None:
    from msight_core.cli.mcapfile import McapFileWriter

    path = tmp_path / "frames.mcap"
    jpeg = b"\xff\xd8not really a jpeg\xff\xd9"
    writer = McapFileWriter(path)
    writer.add_channel("cam.jpeg", "ImageData", "msight", {})
    for i in range(3):
        frame = ImageData(image=jpeg, format="jpeg", sensor_name="cam", capture_timestamp=5.0)
        writer.write("cam.jpeg", 10**18 + i * 10**8, 5 * 10**9, frame.serialize())
    writer.close()

    view = cli.start("view", "--file", str(path), "--loop", "--port", "0", env=cli.env())
    line = view.wait_line("Foxglove WebSocket server on ws://", timeout=60, stream="out")
    port = int(re.search(r":(\d+)\s*$", line.strip()).group(1))  # type: ignore[union-attr]
    got = asyncio.run(_first_messages(port, {"cam.jpeg"}, timeout=60))
    channel, payload = got["cam.jpeg"]
    assert channel["schemaName"] == "foxglove.CompressedImage"
    f = protobuf_fields(payload)
    assert f[2] == [jpeg] and f[3] == [b"jpeg"] and f[4] == [b"cam"]
    assert view.interrupt() == 0, view.stderr
