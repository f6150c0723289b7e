"""Data types: round trips, dispatch, zero-copy, registry and error handling (no broker)."""

from __future__ import annotations

import gc
import json
import struct
import sys
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack
import numpy as np
import pytest

from msight_core.data import (
    BytesData,
    Data,
    DetectionResult,
    ImageData,
    PointCloudData,
    SensorData,
    generate_frame_id,
    get_data_type,
)
from msight_core.data._codec import MAGIC
from msight_core.errors import DeserializationError, SerializationError


@dataclass(eq=False)
class Everything(Data, tag="test_data.everything"):
    none: Any = None
    flag: bool = True
    count: int = 2**70
    ratio: float = 0.25
    text: str = "héllo ✓"
    blob: bytes = b"\x00\x01binary"
    items: list = field(default_factory=lambda: [1, "a", None, [2.5, b"x"]])
    pair: tuple = (1, (2, "three"))
    mapping: dict = field(default_factory=lambda: {"a": 1, "b": [True, None]})
    odd_keys: dict = field(default_factory=lambda: {1: "one", (2, 3): "tuple", "$x": 4})
    array: np.ndarray = field(default_factory=lambda: np.arange(12, dtype=">i4").reshape(3, 4))
    scalar: Any = field(default_factory=lambda: np.float32(1.5))
    nested: Any = None


def roundtrip(value: Data) -> Data:
    return Data.deserialize(value.serialize())


def test_seed_example_round_trips() -> None:
    payload = SensorData(sensor_name="camera1", frame_id=12345).serialize()
    data = Data.deserialize(payload)
    assert type(data) is SensorData
    assert data.sensor_name == "camera1"
    assert data.frame_id == 12345
    assert SensorData.deserialize(payload) == data


def test_sensor_defaults() -> None:
    before = __import__("time").time()
    data = SensorData()
    assert before <= data.capture_timestamp <= before + 5
    assert data.metadata == {}
    assert isinstance(data.frame_id, int) and data.frame_id > 0
    assert data.age() >= 0
    assert data.time.startswith(str(__import__("datetime").date.today().year))


def test_frame_ids_unique_and_increasing() -> None:
    ids = [generate_frame_id() for _ in range(10_000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert max(ids) < 2**63


def test_every_supported_field_type_round_trips() -> None:
    value = Everything(nested=Everything(count=-1, nested=SensorData(sensor_name="inner")))
    back = roundtrip(value)
    assert type(back) is Everything
    assert back == value
    assert back.array.dtype == np.dtype(">i4")
    assert isinstance(back.pair, tuple) and isinstance(back.pair[1], tuple)
    assert back.odd_keys[(2, 3)] == "tuple" and back.odd_keys["$x"] == 4
    assert type(back.scalar) is np.float32
    assert type(back.nested.nested) is SensorData


def test_serialize_into_writes_the_same_bytes_in_place() -> None:
    values = [
        Everything(nested=Everything(count=-1, nested=SensorData(sensor_name="inner"))),
        SensorData(sensor_name="cam"),
        ImageData(image=np.arange(3 * 5 * 7, dtype=np.uint8).reshape(3, 5, 7)[:, ::2]),
    ]
    for value in values:
        expected = value.serialize()
        assert value.serialized_size() == len(expected)
        target = bytearray(b"\xee" * (len(expected) + 7))
        assert value.serialize_into(target) == len(expected)
        assert target[: len(expected)] == expected and target[len(expected) :] == b"\xee" * 7
        as_words = memoryview(bytearray(len(expected) + (-len(expected) % 8))).cast("Q")
        assert value.serialize_into(as_words) == len(expected)  # any writable buffer
        assert Data.deserialize(target[: len(expected)]) == value
    with pytest.raises(ValueError, match="too small"):
        values[0].serialize_into(bytearray(10))
    with pytest.raises(TypeError, match="writable"):
        values[0].serialize_into(memoryview(bytes(4096)))


@pytest.mark.parametrize(
    "dtype",
    ["?", "i1", "i2", "<i4", ">i8", "u1", "<u2", "u4", "u8", "<f2", ">f4", "f8", "c8", ">c16"],
)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3, 4), (1, 0, 2)])
def test_numeric_arrays_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    arr = np.asarray(rng.random(shape) * 100).astype(dtype)
    back = roundtrip(Everything(array=arr))
    assert back.array.dtype == arr.dtype and back.array.shape == arr.shape
    np.testing.assert_array_equal(back.array, arr)


def test_non_contiguous_array_is_serialized_by_value() -> None:
    arr = np.arange(100, dtype=np.float64).reshape(10, 10)[::2, ::3]
    back = roundtrip(Everything(array=arr))
    np.testing.assert_array_equal(back.array, arr)


def test_image_deserialization_is_zero_copy() -> None:
    img = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    payload = ImageData(img, sensor_name="cam").serialize()
    back = ImageData.deserialize(payload)
    assert np.shares_memory(back.image, np.frombuffer(payload, np.uint8))
    assert not back.image.flags.writeable
    assert back.image.ctypes.data % 16 == 0  # aligned inside the message
    np.testing.assert_array_equal(back.image, img)
    # A bytearray gives writable views sharing its memory.
    buf = bytearray(payload)
    view = ImageData.deserialize(buf).image
    assert view.flags.writeable and np.shares_memory(view, np.frombuffer(buf, np.uint8))
    # memoryview input works too
    np.testing.assert_array_equal(ImageData.deserialize(memoryview(payload)).image, img)


def test_serialized_size_is_payload_plus_small_header() -> None:
    img = np.zeros((1080, 1920, 3), np.uint8)
    payload = ImageData(img).serialize()
    assert img.nbytes < len(payload) < img.nbytes + 1024


def test_image_encoded_bytes_and_validation() -> None:
    jpeg = b"\xff\xd8\xff\xe0fake-jpeg"
    back = roundtrip(ImageData(jpeg, format="jpg", sensor_name="cam"))
    assert back.image == jpeg and back.format == "jpeg" and back.is_encoded
    assert back.shape is None
    with pytest.raises(ValueError, match="format"):
        ImageData(b"abc")  # bytes need a format
    with pytest.raises(ValueError):
        ImageData(np.zeros((2, 2)), format="png")
    with pytest.raises(ValueError):
        ImageData(np.zeros(5))
    with pytest.raises(TypeError):
        ImageData("not an image")  # type: ignore[arg-type]
    raw = ImageData.from_ndarray(np.zeros((4, 5), np.uint16), sensor_name="c")
    assert raw.size == (4, 5) and not raw.is_encoded
    np.testing.assert_array_equal(raw.to_ndarray(), np.zeros((4, 5)))


def test_image_with_detections_round_trips() -> None:
    det = DetectionResult(
        boxes=[[0, 0, 10, 10], [5, 5, 20, 30]],
        classes=[1, 2],
        scores=[0.9, 0.4],
        track_ids=[7, 8],
        class_names=["bg", "car", "person"],
    )
    img = ImageData(np.ones((8, 8), np.uint8), detection_results=det)
    back = roundtrip(img)
    assert back == img
    assert back.detection_results.labels() == ["car", "person"]
    assert back.detection_results.num_detections == 2


def test_detection_result_validation() -> None:
    empty = DetectionResult()
    assert roundtrip(empty) == empty and empty.num_detections == 0
    assert DetectionResult(boxes=[], classes=[], scores=[]).boxes.shape == (0, 4)
    with pytest.raises(ValueError, match="shape"):
        DetectionResult(boxes=[[0, 0, 1, 1]], classes=[1, 2], scores=[0.5])
    with pytest.raises(ValueError):
        DetectionResult(boxes=[[0, 0, 1]], classes=[1], scores=[0.5])
    with pytest.raises(TypeError):
        DetectionResult(boxes=[[0, 0, 1, 1]], classes=[1.5], scores=[0.5])
    with pytest.raises(ValueError, match="box_format"):
        DetectionResult(box_format="polar")


def test_point_cloud() -> None:
    pts = np.random.default_rng(2).random((1000, 4), dtype=np.float32)
    pc = PointCloudData(pts, sensor_name="lidar")
    assert pc.field_names == ("x", "y", "z", "intensity")
    back = roundtrip(pc)
    assert back == pc and back.field_names == pc.field_names
    np.testing.assert_array_equal(back.column("intensity"), pts[:, 3])
    np.testing.assert_array_equal(back.xyz, pts[:, :3])
    with pytest.raises(KeyError):
        back.column("ring")
    with pytest.raises(ValueError, match="field_names"):
        PointCloudData(np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError):
        PointCloudData(np.zeros((3, 3)), field_names=("x", "x", "y"))
    six = PointCloudData(np.zeros((2, 6)), field_names=list("xyzabc"))
    assert roundtrip(six).field_names == tuple("xyzabc")


def test_point_cloud_structured_conversion() -> None:
    dtype = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("ring", "<u2")])
    arr = np.zeros(10, dtype=dtype)
    arr["ring"] = np.arange(10)
    with pytest.raises(TypeError, match="from_structured"):
        PointCloudData(arr)
    pc = PointCloudData.from_ndarray(arr, sensor_name="lidar")
    assert pc.field_names == ("x", "y", "z", "ring") and pc.points.shape == (10, 4)
    np.testing.assert_array_equal(pc.to_structured()["ring"], np.arange(10))


def test_bytes_data() -> None:
    back = roundtrip(BytesData(data=bytearray(b"\x00" * 1000 + b"end"), sensor_name="s"))
    assert type(back) is BytesData and back.data == b"\x00" * 1000 + b"end"
    assert type(back.data) is bytes
    with pytest.raises(TypeError):
        BytesData(data="text")  # type: ignore[arg-type]


def test_dispatch_and_type_checks() -> None:
    payload = ImageData(np.zeros((2, 2), np.uint8)).serialize()
    assert type(Data.deserialize(payload)) is ImageData
    assert type(SensorData.deserialize(payload)) is ImageData  # a subclass is accepted
    with pytest.raises(DeserializationError, match="ImageData"):
        PointCloudData.deserialize(payload)
    with pytest.raises(DeserializationError):
        BytesData.deserialize(SensorData().serialize())
    with pytest.raises(TypeError):
        Data.deserialize("text")  # type: ignore[arg-type]


def test_user_subclass_registers_without_boilerplate() -> None:
    @dataclass
    class LocalReading(SensorData):
        value: float = 0.0
        samples: list[int] = field(default_factory=list)

    assert get_data_type("LocalReading") is LocalReading
    back = Data.deserialize(LocalReading(value=2.5, samples=[1, 2], sensor_name="x").serialize())
    assert type(back) is LocalReading and back.value == 2.5 and back.samples == [1, 2]
    assert back.sensor_name == "x"


def test_tag_collision_is_refused_but_redefinition_replaces() -> None:
    def define() -> type:
        @dataclass
        class Collider(Data):
            x: int = 0

        return Collider

    first, second = define(), define()  # same module and qualname: replaces
    assert get_data_type("Collider") is second is not first
    with pytest.raises(TypeError, match="already used"):

        @dataclass
        class ImageData(Data):
            y: int = 0


def test_missing_dataclass_decorator_is_reported() -> None:
    class Undecorated(SensorData):
        value: int = 3
        kind: ClassVar[str] = "x"

    with pytest.raises(SerializationError, match="@dataclass"):
        Undecorated().serialize()


def test_unsupported_values_raise_serialization_error() -> None:
    for bad in ({1, 2}, object(), np.array(["a", "b"]), np.zeros(2, dtype="datetime64[s]")):
        with pytest.raises(SerializationError):
            Everything(none=bad).serialize()
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(SerializationError, match="deeper"):
        Everything(items=loop).serialize()


def test_init_false_fields_round_trip() -> None:
    @dataclass
    class WithDerived(Data):
        a: int = 1
        doubled: int = field(init=False, default=0)

        def __post_init__(self) -> None:
            self.doubled = self.a * 2

    back = roundtrip(WithDerived(a=21))
    assert back.doubled == 42


def test_newer_sender_fields_are_ignored() -> None:
    @dataclass
    class Versioned(Data, tag="test_data.versioned"):
        a: int = 1

    payload = Versioned(a=5).serialize()
    tag, meta = _rewrite(payload, lambda m: {**m, "added_later": [1, 2]})
    assert Data.deserialize(_build(tag, meta)).a == 5


# -- malformed input ----------------------------------------------------------------


def _split(payload: bytes) -> tuple[str, dict[str, Any]]:
    _, _, _, tag_len, meta_len, _ = struct.unpack_from("<4sBBHII", payload)
    tag = payload[20 : 20 + tag_len].decode()
    return tag, json.loads(payload[20 + tag_len : 20 + tag_len + meta_len])


def _build(tag: str, meta: dict[str, Any], buffers: list[bytes] | None = None) -> bytes:
    from msight_core.data._codec import pack

    return pack(tag, meta, [memoryview(b) for b in buffers or []])


def _rewrite(payload: bytes, change: Any) -> tuple[str, dict[str, Any]]:
    tag, meta = _split(payload)
    return tag, change(meta)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x89MSD",
        b"hello world, not a message",
        msgpack.packb({"data_type": "x", "sensor_name": "cam"}),
        MAGIC + bytes(16),
    ],
)
def test_garbage_raises_deserialization_error(payload: bytes) -> None:
    with pytest.raises(DeserializationError):
        Data.deserialize(payload)


def test_msgpack_from_the_original_gets_a_hint() -> None:
    with pytest.raises(DeserializationError, match="msgpack"):
        Data.deserialize(msgpack.packb({"data_type": "msight_core.data.base.SensorData"}))


def test_truncation_and_trailing_bytes() -> None:
    payload = ImageData(np.arange(1000, dtype=np.uint8).reshape(10, 100)).serialize()
    for cut in (1, 10, 19, 20, 30, len(payload) // 2, len(payload) - 1):
        with pytest.raises(DeserializationError):
            Data.deserialize(payload[:cut])
    with pytest.raises(DeserializationError, match="length"):
        Data.deserialize(payload + b"\x00")


def test_header_corruption_is_detected() -> None:
    payload = bytearray(SensorData(sensor_name="camera1").serialize())
    payload[30] ^= 0x01
    with pytest.raises(DeserializationError, match="checksum"):
        Data.deserialize(bytes(payload))


def test_unknown_tag_and_version() -> None:
    with pytest.raises(DeserializationError, match="unknown data type"):
        Data.deserialize(_build("no.such.Type", {}))
    payload = bytearray(SensorData().serialize())
    payload[4] = 2
    crc = zlib.crc32(bytes(payload[20:]), zlib.crc32(bytes(payload[:16])))
    # the table ends where the metadata ends for a message without buffers
    struct.pack_into("<I", payload, 16, crc)
    with pytest.raises(DeserializationError, match="version 2"):
        Data.deserialize(bytes(payload))


@pytest.mark.parametrize(
    "array_meta",
    [
        {"$a": 0, "d": "|u1", "s": [3, 3]},  # 9 bytes claimed, 8 present
        {"$a": 0, "d": "|u1", "s": [-8]},
        {"$a": 0, "d": "|u1", "s": "8"},
        {"$a": 0, "d": "|O", "s": [1]},
        {"$a": 0, "d": "<f3", "s": [2]},
        {"$a": 0, "d": "<V8", "s": [1]},
        {"$a": 5, "d": "|u1", "s": [8]},
        {"$a": 0, "d": "|u1", "s": [8], "extra": 1},
        {"$a": True, "d": "|u1", "s": [8]},
        {"$unknown": 1},
        {"$t": "abc"},
        {"$d": [[[1], 2]]},
        {"$g": "<i1", "v": 1000},
        {"$D": "ImageData", "f": {"image": "not an array"}},
        {"$D": "ImageData", "f": []},
    ],
)
def test_bad_values_raise_deserialization_error(array_meta: dict[str, Any]) -> None:
    payload = _build("test_data.everything", {"array": array_meta}, [bytes(8)])
    with pytest.raises(DeserializationError):
        Everything.deserialize(payload)


def test_wrong_image_shape_is_refused() -> None:
    payload = _build("ImageData", {"image": {"$a": 0, "d": "|u1", "s": [8]}}, [bytes(8)])
    with pytest.raises(DeserializationError, match="raw image"):
        Data.deserialize(payload)


def test_deeply_nested_metadata_is_refused() -> None:
    deep: Any = 0
    for _ in range(200):
        deep = [deep]
    with pytest.raises(DeserializationError):
        Data.deserialize(_build("test_data.everything", {"items": deep}))
    # JSON nested past the interpreter's recursion limit, written by hand
    text = "[" * (sys.getrecursionlimit() + 10) + "]" * (sys.getrecursionlimit() + 10)
    raw = _build("test_data.everything", {"items": 0})
    tag, _ = _split(raw)
    head = struct.pack("<4sBBHII", MAGIC, 1, 0, len(tag), len(text), 0)
    body = tag.encode() + text.encode()
    crafted = head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body
    with pytest.raises(DeserializationError):
        Data.deserialize(crafted)


def test_a_decoded_message_dropped_lets_go_of_its_buffer_without_a_gc_pass() -> None:
    # Zero-copy buffers (shared memory) are given back when nothing points into
    # them: decoding must not leave a reference cycle holding views of the buffer.
    buf = bytearray(ImageData(np.ones((8, 8), np.uint8)).serialize())
    gc.disable()
    try:
        data = Data.deserialize(memoryview(buf))
        assert data.image.sum() == 64
        del data
        buf.extend(b"x")  # BufferError if any view of buf were still alive
    finally:
        gc.enable()
