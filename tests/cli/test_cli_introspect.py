"""``msight topics``, ``hz``, ``bw``, ``echo`` and ``sub --out`` images (issue 20, item 4)."""

from __future__ import annotations

import re
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from msight_core.data import ImageData, PointCloudData
from msight_core.pubsub import get_pubsub

RATE = 40.0  # Hz of the paced publisher
SIZE = 1000  # bytes per message


def _paced(env: dict[str, str], topic: str, rate: float, seconds: float) -> None:
    """Publish SIZE-byte messages at ``rate`` Hz on absolute deadlines."""
    with get_pubsub(env=env) as backend:
        start = time.monotonic()
        for i in range(int(rate * seconds) + 1):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            backend.publish(topic, bytes([i % 256]) * SIZE)
        backend.flush()


@pytest.mark.timeout(120)
def test_hz_and_bw_measure_a_paced_publisher_within_5_percent(
    cli: Any, redis_server: Any, unique_topic: str
) -> None:
    env = cli.env(redis_server.env())
    hz = cli.start("hz", unique_topic, env=env)
    bw = cli.start("bw", unique_topic, "--window", "1000", env=env)
    for running in (hz, bw):
        running.wait_line("subscribed to", timeout=60, stream="err")
    _paced(env, unique_topic, RATE, 3.0)
    time.sleep(0.5)
    assert hz.interrupt() == 0 and bw.interrupt() == 0, hz.stderr + bw.stderr

    last = hz.stdout.strip().splitlines()[-1]
    rate = float(re.search(r"average rate: ([\d.]+)", last).group(1))  # type: ignore[union-attr]
    assert abs(rate - RATE) / RATE < 0.05, last
    low, high = (float(x) for x in re.search(r"min: ([\d.]+)s max: ([\d.]+)s", last).groups())  # type: ignore[union-attr]
    assert low <= 1 / RATE <= high and "window: 121" in last
    assert len(hz.stdout.splitlines()) >= 3  # a report every second, then the last one

    last = bw.stdout.strip().splitlines()[-1]
    per_s = float(re.search(r"\((\d+) B/s\)", last).group(1))  # type: ignore[union-attr]
    assert abs(per_s - RATE * SIZE) / (RATE * SIZE) < 0.05, last
    assert "from 121 messages" in last and "mean: 1000 B" in last


@pytest.mark.timeout(60)
def test_topics_on_redis_shows_registry_and_subscribers(
    cli: Any, redis_server: Any, unique_topic: str
) -> None:
    from msight_core.topics import get_topic
    from msight_core.utils import get_redis_client

    env = cli.env(redis_server.env())
    registered, live = f"{unique_topic}.reg", f"{unique_topic}.live"
    client = get_redis_client(env=env)
    get_topic(client, registered, register_if_not_exist=True, data_type=ImageData)
    client.close()
    sub = cli.start("sub", live, env=env)
    sub.wait_line("subscribed to", timeout=30, stream="err")
    result = cli.run("topics", env=env)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:]}
    assert rows[registered] == ["0", "ImageData"]
    assert rows[live] == ["1", "-"]


@pytest.mark.timeout(60)
def test_topics_on_nats_lists_jetstream_streams(
    cli: Any, nats_server: Any, unique_topic: str
) -> None:
    pytest.importorskip("msight_core.pubsub.nats")
    env = cli.env({**nats_server.env(), "MSIGHT_PUBSUB_BACKEND": "nats"})
    with get_pubsub(env={**env, "MSIGHT_NATS_JETSTREAM": "true"}) as backend:
        backend.publish(unique_topic, b"kept")
        backend.flush()
    result = cli.run("topics", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split() == [
        "STREAM", "SUBJECTS", "MESSAGES", "BYTES", "CONSUMERS"
    ]  # fmt: skip
    assert any(unique_topic in line.split() for line in result.stdout.splitlines()[2:])
    assert "listed: JetStream streams" in result.stderr


@pytest.mark.timeout(90)
def test_topics_on_kafka_lists_partitions(cli: Any, kafka_server: Any, unique_topic: str) -> None:
    pytest.importorskip("msight_core.pubsub.kafka")
    env = cli.env({**kafka_server.env(), "MSIGHT_PUBSUB_BACKEND": "kafka"})
    with get_pubsub(env={**env, "MSIGHT_KAFKA_NUM_PARTITIONS": "3"}) as backend:
        backend.publish(unique_topic, b"x")
        backend.flush()
    result = cli.run("topics", env=env)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:]}
    assert rows[unique_topic][0] == "3"


def _png_pixels(data: bytes) -> tuple[int, int, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    start = data.index(b"IDAT") + 4
    length = int.from_bytes(data[start - 8 : start - 4], "big")
    return width, height, zlib.decompress(data[start : start + length])


@pytest.mark.timeout(60)
def test_echo_out_saves_images_as_png_and_arrays_as_npy(
    cli: Any, redis_server: Any, unique_topic: str, tmp_path: Path
) -> None:
    env = cli.env(redis_server.env())
    out = tmp_path / "saved"
    echo = cli.start("echo", unique_topic, "-n", "2", "-t", "30", "--out", str(out), env=env)
    echo.wait_line("subscribed to", timeout=30, stream="err")
    bgr = np.zeros((2, 3, 3), np.uint8)
    bgr[..., 0] = 255  # pure blue in msight's (OpenCV's) BGR order
    points = np.arange(12, dtype=np.float32).reshape(3, 4)
    with get_pubsub(env=env) as backend:
        backend.publish(unique_topic, ImageData(image=bgr).serialize())
        backend.publish(unique_topic, PointCloudData(points=points).serialize())
        backend.flush()
    assert echo.wait(30) == 0, echo.stderr
    saved = [Path(line) for line in echo.stdout.splitlines()]
    names = sorted(p.name.split(".", 3)[-1] for p in saved)
    assert names == ["000001.bin", "000001.png", "000002.bin", "000002.points.npy"], names
    png = next(p for p in saved if p.suffix == ".png").read_bytes()
    width, height, raw = _png_pixels(png)
    assert (width, height) == (3, 2)
    assert raw == (b"\x00" + b"\x00\x00\xff" * 3) * 2  # rows of RGB blue, filter 0
    npy = next(p for p in saved if p.name.endswith(".npy"))
    assert np.array_equal(np.load(npy), points)
