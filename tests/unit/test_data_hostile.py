"""Hostile messages to ``Data.deserialize`` (issue 15, rows 1 and 3).

Anyone who can publish on a topic can hand a subscriber any bytes. The rules these
tests hold the decoder to:

- decoding a message of N bytes never allocates more than a small constant times N
  plus a fixed bound (measured with tracemalloc, numpy's buffers included);
- every length, size, count or index in the message is checked against the bytes
  present, and every decoded field against its annotation;
- anything wrong is a ``DeserializationError``, and the next valid message still
  decodes.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msight_core.data import (
    BytesData,
    Data,
    DetectionResult,
    ImageData,
    PointCloudData,
    SensorData,
)
from msight_core.data._codec import MAGIC, MAX_HASH_COLLISIONS, pack, unpack
from msight_core.data._fieldcheck import field_checks
from msight_core.errors import DeserializationError

MiB = 1 << 20
# What decoding may cost: the parsed JSON and the values built from it. Metadata made
# of nothing but empty lists, dicts or tuples measures ~30x its size; 48 leaves room.
FACTOR = 48
FIXED = MiB

BUILT_IN = (SensorData, ImageData, PointCloudData, DetectionResult, BytesData)


@dataclass(eq=False)
class Loose(Data, tag="test_data_hostile.loose"):
    """A user type with an untyped field: anything the codec carries may land in it."""

    anything: Any = None


def decode_peak(payload: bytes) -> tuple[Any, int]:
    """Decode ``payload`` under tracemalloc: (the value or the exception, peak bytes)."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        result: Any = Data.deserialize(payload)
    except Exception as exc:  # noqa: BLE001 - the caller asserts on the type
        result = exc
    peak = tracemalloc.get_traced_memory()[1] - before
    if not was_tracing:
        tracemalloc.stop()
    return result, peak


def assert_typed_and_bounded(payload: bytes) -> Any:
    result, peak = decode_peak(payload)
    if isinstance(result, Exception) and not isinstance(result, DeserializationError):
        pytest.fail(f"untyped {type(result).__name__}: {result}")
    assert peak <= FACTOR * len(payload) + FIXED, (peak, len(payload))
    return result


def resign(tag: str, meta: Any, buffers: Any) -> bytes:
    """A message with this metadata and a valid checksum (the decoder itself is tested)."""
    return pack(tag, meta, [memoryview(b) for b in buffers])


def sensor_fields(obj: Data) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _valid() -> list[tuple[Data, bytes]]:
    rng = np.random.default_rng(15)
    values: list[Data] = [
        SensorData(sensor_name="cam1", frame_id=7, metadata={"k": [1, 2.5, None], "b": b"xy"}),
        ImageData(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), sensor_name="cam1"),
        ImageData(
            b"\xff\xd8" + bytes(2000),
            format="jpeg",
            detection_results=DetectionResult(boxes=[[0, 0, 1, 1]], classes=[1], scores=[0.5]),
        ),
        PointCloudData(rng.random((200, 4), dtype=np.float32), sensor_name="lidar"),
        DetectionResult(
            boxes=[[0, 0, 1, 1], [2, 2, 3, 3]],
            classes=[3, 4],
            scores=[0.5, 0.25],
            track_ids=[1, 2],
            class_names=["a", "b", "c", "d", "e"],
        ),
        BytesData(data=bytes(range(256)) * 256, sensor_name="raw"),  # one 64 KB buffer
        Loose(anything={"t": (1, "x"), 3: np.arange(4), "s": np.float32(2)}),
    ]
    return [(v, v.serialize()) for v in values]


VALID = _valid()


def assert_valid_still_decodes() -> None:
    for value, payload in VALID:
        assert Data.deserialize(payload) == value


# -- row 1: buffer references ---------------------------------------------------------


def test_one_buffer_referenced_many_times_is_refused_in_bounded_memory() -> None:
    """Issue 15 row 1: 5,500 references to a 50 KB buffer grew RSS by 262 MiB."""
    big = bytes(50_000)
    payload = resign("SensorData", {"metadata": {"refs": [{"$b": 0}] * 5500}}, [big])
    assert len(payload) < 110_000
    result, peak = decode_peak(payload)
    assert isinstance(result, DeserializationError), type(result)
    assert "more than once" in str(result)
    assert peak <= FACTOR * len(payload) + FIXED
    assert_valid_still_decodes()


def test_arrays_may_not_share_a_buffer() -> None:
    ref = {"$a": 0, "d": "|u1", "s": [8]}
    payload = resign("test_data_hostile.loose", {"anything": [ref, dict(ref)]}, [bytes(8)])
    with pytest.raises(DeserializationError, match="more than once"):
        Data.deserialize(payload)


def test_a_buffer_only_an_unknown_field_references_is_skipped() -> None:
    """A newer sender's array field we do not know leaves its buffer unreferenced."""
    tag, meta, buffers = unpack(ImageData(np.ones((4, 4), np.uint8)).serialize())
    meta["added_later"] = {"$a": len(buffers), "d": "<f4", "s": [2]}
    payload = resign(tag, meta, [*buffers, bytes(8)])
    back = Data.deserialize(payload)
    assert isinstance(back, ImageData) and back.image.sum() == 16


def test_a_large_buffer_table_is_not_materialized() -> None:
    """20,000 empty table entries: the decoder reads them, it does not keep them."""
    payload = resign("SensorData", {}, [b""] * 20_000)
    result, peak = decode_peak(payload)
    assert isinstance(result, SensorData)
    assert peak < len(payload), peak


def test_table_entries_are_checked_against_the_bytes_present() -> None:
    good = resign("SensorData", {"metadata": {"b": {"$b": 0}}}, [b"0123456789"])
    tag_len, meta_len = struct.unpack_from("<HI", good, 6)
    table = 20 + tag_len + meta_len
    for offset, length in ((table + 16, 1 << 40), (1 << 63, 1), (0, 10), (2**64 - 1, 2)):
        raw = bytearray(good)
        struct.pack_into("<QQ", raw, table, offset, length)
        struct.pack_into(
            "<I", raw, 16, zlib.crc32(bytes(raw[20 : table + 16]), zlib.crc32(raw[:16]))
        )
        with pytest.raises(DeserializationError, match="buffer table"):
            Data.deserialize(bytes(raw))
    # a count of buffers the message cannot hold
    raw = bytearray(good)
    struct.pack_into("<I", raw, 12, 0xFFFFFFFF)
    with pytest.raises(DeserializationError, match="truncated"):
        Data.deserialize(bytes(raw))


@pytest.mark.parametrize(
    "shape",
    [[0, 2**62, 2**62], [0, 2**63], [0] + [2**40] * 5, [2**63, 0], [1] * 33, [-1], [1.0], [True]],
)
def test_array_shapes_are_bounded_before_reshape(shape: list[Any]) -> None:
    meta = {"anything": {"$a": 0, "d": "|u1", "s": shape}}
    with pytest.raises(DeserializationError, match="shape|does not match"):
        Data.deserialize(resign("test_data_hostile.loose", meta, [b""]))


def test_colliding_dict_keys_are_refused_in_linear_time() -> None:
    """Int hashes are not randomized: 4,000 keys hashing alike would cost seconds."""
    modulus = 2**61 - 1  # hash(k * modulus) == 0 for every k
    pairs = [[k * modulus, None] for k in range(4000)]
    payload = resign("test_data_hostile.loose", {"anything": {"$d": pairs}}, [])
    started = time.perf_counter()
    with pytest.raises(DeserializationError, match="share one hash"):
        Data.deserialize(payload)
    assert time.perf_counter() - started < 0.5
    # A few natural collisions (hash(-1) == hash(-2)) are fine.
    few = [[-1, "a"], [-2, "b"]] + [[k * modulus, k] for k in range(MAX_HASH_COLLISIONS - 1)]
    back = Data.deserialize(resign("test_data_hostile.loose", {"anything": {"$d": few}}, []))
    assert back.anything[-1] == "a" and back.anything[-2] == "b"


def test_numpy_scalars_that_do_not_fit_are_typed_errors() -> None:
    for bad in ({"$g": "<i1", "v": 1000}, {"$g": "<c16", "v": ["1", "2"]}, {"$g": "<u1", "v": -1}):
        with pytest.raises(DeserializationError):
            Data.deserialize(resign("test_data_hostile.loose", {"anything": bad}, []))


# -- row 3: every field of every Data type is type-checked --------------------------


@pytest.mark.parametrize("cls", BUILT_IN, ids=lambda c: c.__name__)
def test_every_field_of_the_built_in_types_is_checked(cls: type[Data]) -> None:
    assert set(field_checks(cls, Data)) == {f.name for f in dataclasses.fields(cls)}


NESTED_EVIL = {"$D": "DetectionResult", "f": {"capture_timestamp": "evil"}}
BAD_FIELDS = [
    # (type tag, field, encoded value)
    ("SensorData", "capture_timestamp", "evil"),  # issue 15 row 3
    ("SensorData", "capture_timestamp", None),
    ("SensorData", "capture_timestamp", True),
    ("SensorData", "capture_timestamp", 10**400),  # an int no float can hold
    ("SensorData", "creation_timestamp", [1.0]),
    ("SensorData", "frame_id", "12345"),
    ("SensorData", "frame_id", 1.5),
    ("SensorData", "frame_id", False),
    ("SensorData", "sensor_name", 5),
    ("SensorData", "sensor_name", {"$b": 0}),
    ("SensorData", "device_name", ["edge"]),
    ("SensorData", "metadata", [1, 2]),
    ("SensorData", "metadata", {"$d": [[1, "int key"]]}),
    ("ImageData", "image", "pixels"),
    ("ImageData", "image", [[1, 2], [3, 4]]),
    ("ImageData", "format", 3),
    ("ImageData", "detection_results", {"$D": "SensorData", "f": {}}),
    ("ImageData", "detection_results", NESTED_EVIL),
    ("PointCloudData", "points", [[1.0, 2.0, 3.0]]),
    ("PointCloudData", "field_names", {"$t": ["x", 1, "z"]}),
    ("PointCloudData", "field_names", "xyz"),
    ("DetectionResult", "boxes", "boxes"),
    ("DetectionResult", "classes", 3),
    ("DetectionResult", "scores", None),
    ("DetectionResult", "track_ids", [1, 2]),
    ("DetectionResult", "class_names", ["car", 3]),
    ("DetectionResult", "class_names", "car"),
    ("DetectionResult", "box_format", None),
    ("DetectionResult", "source_frame_id", "7"),
    ("BytesData", "data", "text"),
    ("BytesData", "data", None),
    ("BytesData", "data", [1, 2, 3]),
]


@pytest.mark.parametrize(("tag", "name", "value"), BAD_FIELDS, ids=repr)
def test_wrong_field_types_are_refused(tag: str, name: str, value: Any) -> None:
    payload = resign(tag, {name: value}, [b"\x00" * 8])
    with pytest.raises(DeserializationError) as info:
        Data.deserialize(payload)
    assert name in str(info.value) or "capture_timestamp" in str(info.value)


@pytest.mark.parametrize(
    ("tag", "fields"),
    [
        ("ImageData", {"image": {"$a": 0, "d": "<c8", "s": [1, 1]}}),  # complex pixels
        ("ImageData", {"image": {"$a": 0, "d": "|u1", "s": [3, 3]}}),  # 9 bytes, 8 present
        ("PointCloudData", {"points": {"$a": 0, "d": "|u1", "s": [8]}}),  # not (N, K)
        (
            "PointCloudData",
            {"points": {"$a": 0, "d": "|u1", "s": [2, 4]}, "field_names": {"$t": ["x"]}},
        ),
        ("DetectionResult", {"boxes": {"$a": 0, "d": "<f4", "s": [1, 2]}}),  # not (N, 4)
        ("DetectionResult", {"classes": {"$a": 0, "d": "<f8", "s": [1]}}),  # floats as ids
        ("DetectionResult", {"box_format": "diagonal"}),
    ],
)
def test_arrays_and_values_inconsistent_with_their_type_are_refused(
    tag: str, fields: dict[str, Any]
) -> None:
    with pytest.raises(DeserializationError):
        Data.deserialize(resign(tag, fields, [b"\x00" * 8]))


def test_numeric_tower_and_numpy_scalars_are_accepted() -> None:
    meta = {
        "capture_timestamp": 1700000000,  # an int is a valid float
        "creation_timestamp": {"$g": "<f4", "v": 2.5},
        "frame_id": {"$g": "<i8", "v": 5},
        "metadata": {"a": {"$d": [[1, 2]]}},  # values of metadata are free
    }
    back = Data.deserialize(resign("SensorData", meta, []))
    assert back.capture_timestamp == 1700000000 and back.frame_id == 5
    assert back.metadata == {"a": {1: 2}}
    assert back.age() > 0


# -- property tests -----------------------------------------------------------------


def _nodes(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _nodes(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _nodes(v, (*path, i))


def _replace(root: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    parent = root
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = new
    return root


indices = st.integers(-2, 5) | st.sampled_from([2**31, 2**64, True, 1.0, "0", None])
dtypes = st.sampled_from(["|u1", "<f4", ">i8", "<c16", "|b1", "<U4", "|O", 3])
dims = st.integers(0, 300) | st.sampled_from([2**62, 2**63, -1, 1.5])
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12)
)
tags = st.sampled_from(
    ["SensorData", "ImageData", "PointCloudData", "DetectionResult", "BytesData", "Data", "Nope"]
)
field_names = st.sampled_from(
    [f.name for cls in BUILT_IN for f in dataclasses.fields(cls)] + ["$b", "$a", "x"]
)
leaves = st.one_of(
    json_scalars,
    st.builds(lambda i: {"$b": i}, indices),
    st.builds(
        lambda i, d, s: {"$a": i, "d": d, "s": s}, indices, dtypes, st.lists(dims, max_size=4)
    ),
    st.builds(
        lambda d, v: {"$g": d, "v": v}, dtypes, json_scalars | st.lists(json_scalars, max_size=2)
    ),
)
hostile = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=4) | field_names, inner, max_size=4),
        # the same value many times: amplification through references (of a leaf only,
        # so that repetitions do not nest into a message of millions of values)
        st.builds(lambda x, k: [x] * k, leaves, st.integers(1, 3000)),
        st.builds(lambda xs: {"$t": xs}, st.lists(inner, max_size=4)),
        st.builds(
            lambda ps: {"$d": [list(p) for p in ps]}, st.lists(st.tuples(inner, inner), max_size=4)
        ),
        st.builds(
            lambda t, f: {"$D": t, "f": f}, tags, st.dictionaries(field_names, inner, max_size=4)
        ),
    ),
    max_leaves=12,
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=6),
)
def test_mutated_bytes_are_typed_errors_in_bounded_memory(
    valid: tuple[Data, bytes], edits: list[tuple[int, int]]
) -> None:
    buf = bytearray(valid[1])
    for pos, byte in edits:
        buf[pos % len(buf)] = byte
    assert_typed_and_bounded(bytes(buf))
    assert_valid_still_decodes()


@settings(max_examples=350, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(VALID), st.data(), hostile, tags | st.just(None))
def test_hostile_metadata_is_typed_errors_in_bounded_memory(
    valid: tuple[Data, bytes], data: st.DataObject, new: Any, tag: str | None
) -> None:
    """Replace one node of a real message's metadata, re-sign it, decode it."""
    old_tag, meta, buffers = unpack(valid[1])
    buffers = [bytes(b) for b in buffers]
    paths = list(_nodes(meta))
    path = paths[data.draw(st.integers(0, len(paths) - 1))]
    try:
        payload = resign(tag or old_tag, _replace(meta, path, new), buffers)
    except Exception:  # noqa: BLE001 - the sender refused it (not a dict at the top, NaN ...)
        return
    assert len(payload) < 4 * MiB  # the strategy stays small; the decoder is what is tested
    result = assert_typed_and_bounded(payload)
    if isinstance(result, Data):
        # Whatever got through satisfies every checked annotation of its type.
        for name, (check, expected) in field_checks(type(result), Data).items():
            assert check(getattr(result, name)), (name, expected)
    assert_valid_still_decodes()


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), max_size=6),
    st.integers(0, 2**32 - 1) | st.none(),
)
def test_forged_buffer_tables_are_typed_errors(
    valid: tuple[Data, bytes], entries: list[tuple[int, int]], count: int | None
) -> None:
    """Rewrite the buffer table (and maybe the count) and re-sign the header."""
    tag, meta, _ = unpack(valid[1])
    tag_b = tag.encode()
    meta_b = json.dumps(meta if not isinstance(meta, dict) else {}, separators=(",", ":")).encode()
    table = b"".join(struct.pack("<QQ", o, n) for o, n in entries)
    head = struct.pack(
        "<4sBBHII", MAGIC, 1, 0, len(tag_b), len(meta_b), len(entries) if count is None else count
    )
    body = tag_b + meta_b + table
    crc = zlib.crc32(body, zlib.crc32(head))
    payload = head + struct.pack("<I", crc) + body + bytes(4096)
    assert_typed_and_bounded(payload)
    assert_valid_still_decodes()


def test_valid_messages_decode_under_the_same_bound() -> None:
    for value, payload in VALID:
        result = assert_typed_and_bounded(payload)
        assert result == value
    # zero-copy: a big image costs no more than its metadata
    image = ImageData(np.zeros((1080, 1920, 3), np.uint8)).serialize()
    result, peak = decode_peak(image)
    assert isinstance(result, ImageData) and peak < 64 * 1024
