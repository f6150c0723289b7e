"""Encode/decode cost of msight Data messages vs msgpack (msight-core 2.x) vs a memcpy.

Run: ``python benchmarks/bench_data.py [--repeat N]``. For each payload it times

- ``msight``: ``Data.serialize()`` and ``Data.deserialize()`` (zero-copy arrays);
- ``msgpack``: what msight-core 2.x does, a msgpack map of the same fields with
  each array as ``tobytes()`` plus dtype/shape, decoded with ``unpackb`` and
  ``np.frombuffer``;
- ``memcpy``: one plain copy of the same number of bytes (the floor for
  anything that produces a fresh ``bytes`` object).

Times are medians over ``--repeat`` runs, in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from msight_core.data import Data, ImageData, PointCloudData, SensorData


def _median_ms(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _msgpack_encode(value: Data) -> bytes:
    fields: dict[str, Any] = {"data_type": type(value).__name__}
    for name, v in vars(value).items():
        if isinstance(v, np.ndarray):
            fields[name] = {"dtype": v.dtype.str, "shape": list(v.shape), "data": v.tobytes()}
        else:
            fields[name] = v
    return msgpack.packb(fields, use_bin_type=True)


def _msgpack_decode(payload: bytes) -> dict[str, Any]:
    fields = msgpack.unpackb(payload, raw=False)
    for name, v in fields.items():
        if isinstance(v, dict) and "data" in v:
            fields[name] = np.frombuffer(v["data"], np.dtype(v["dtype"])).reshape(v["shape"])
    return fields


def cases() -> list[tuple[str, Data]]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (2048, 2731, 3), dtype=np.uint8)  # 16.8 MB
    cloud = rng.random((131_072, 4), dtype=np.float32)  # 2.1 MB
    return [
        (f"image {image.nbytes / 1e6:.1f} MB", ImageData(image, sensor_name="cam1")),
        (f"point cloud {cloud.nbytes / 1e6:.1f} MB", PointCloudData(cloud, sensor_name="lidar1")),
        ("small SensorData", SensorData(sensor_name="camera1", frame_id=12345)),
    ]


def run(repeat: int) -> list[dict[str, Any]]:
    rows = []
    for label, value in cases():
        ours = value.serialize()
        theirs = _msgpack_encode(value)
        decoded = Data.deserialize(ours)
        assert type(decoded) is type(value)
        raw = ours  # memcpy the same number of bytes as the message
        rows.append(
            {
                "payload": label,
                "size": len(ours),
                "msight_ser": _median_ms(value.serialize, repeat),
                "msgpack_ser": _median_ms(lambda v=value: _msgpack_encode(v), repeat),
                "memcpy": _median_ms(lambda r=raw: bytearray(r), repeat),
                "msight_de": _median_ms(lambda p=ours: Data.deserialize(p), repeat),
                "msgpack_de": _median_ms(lambda p=theirs: _msgpack_decode(p), repeat),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    rows = run(args.repeat)
    header = (
        f"{'payload':<24} {'bytes':>11} | {'serialize ms':^26} | {'memcpy':>7} | "
        f"{'deserialize ms':^18}"
    )
    sub = f"{'':<24} {'':>11} | {'msight':>12} {'msgpack':>13} | {'ms':>7} | {'msight':>8} {'msgpack':>9}"
    print(header)
    print(sub)
    print("-" * len(sub))
    for r in rows:
        print(
            f"{r['payload']:<24} {r['size']:>11,} | {r['msight_ser']:>12.3f} "
            f"{r['msgpack_ser']:>13.3f} | {r['memcpy']:>7.3f} | {r['msight_de']:>8.3f} "
            f"{r['msgpack_de']:>9.3f}"
        )


if __name__ == "__main__":
    main()
