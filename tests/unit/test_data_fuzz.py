"""Property tests: the decoder returns a value or raises DeserializationError, nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from msight_core.data import (
    BytesData,
    Data,
    DetectionResult,
    ImageData,
    PointCloudData,
    SensorData,
)
from msight_core.errors import DeserializationError


@dataclass(eq=False)
class FuzzRecord(Data, tag="test_data_fuzz.record"):
    value: Any = None
    array: Any = None
    extra: dict = field(default_factory=dict)


def _valid_messages() -> list[bytes]:
    rng = np.random.default_rng(3)
    return [
        SensorData(
            sensor_name="camera1", frame_id=12345, metadata={"k": [1, 2.5, None]}
        ).serialize(),
        ImageData(rng.integers(0, 255, (6, 5, 3), dtype=np.uint8), sensor_name="c").serialize(),
        ImageData(b"\xff\xd8jpeg", format="jpeg").serialize(),
        PointCloudData(rng.random((7, 4), dtype=np.float32)).serialize(),
        DetectionResult(boxes=[[0, 0, 1, 1]], classes=[3], scores=[0.5], track_ids=[1]).serialize(),
        BytesData(data=b"\x00payload").serialize(),
        FuzzRecord(value=(1, {2: "x"}), array=np.arange(6).reshape(2, 3)).serialize(),
    ]


VALID = _valid_messages()

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
        st.dictionaries(st.integers(), inner, max_size=3),
    ),
    max_leaves=12,
)
numeric_dtypes = st.sampled_from(
    ["?", "i1", "<i2", ">i4", "i8", "u1", "<u2", ">u4", "u8", "<f2", "f4", ">f8", "c8", "<c16"]
)
arrays = numeric_dtypes.flatmap(
    lambda d: hnp.arrays(np.dtype(d), hnp.array_shapes(min_dims=0, max_dims=4, max_side=5))
)


def _decode_or_error(payload: bytes) -> None:
    try:
        Data.deserialize(payload)
    except DeserializationError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    values, st.one_of(st.none(), arrays), st.dictionaries(st.text(max_size=5), values, max_size=3)
)
def test_random_values_round_trip(value: Any, array: Any, extra: dict) -> None:
    record = FuzzRecord(value=value, array=array, extra=extra)
    back = Data.deserialize(record.serialize())
    assert back == record


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes(payload: bytes) -> None:
    _decode_or_error(payload)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_after_a_valid_header(tail: bytes) -> None:
    _decode_or_error(VALID[0][:20] + tail)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=6),
)
def test_mutated_messages(payload: bytes, edits: list[tuple[int, int]]) -> None:
    buf = bytearray(payload)
    for pos, byte in edits:
        buf[pos % len(buf)] = byte
    _decode_or_error(bytes(buf))


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(VALID), st.integers(min_value=0), st.binary(max_size=20))
def test_truncated_or_spliced_messages(payload: bytes, cut: int, junk: bytes) -> None:
    cut %= len(payload)
    _decode_or_error(payload[:cut])
    _decode_or_error(payload[:cut] + junk + payload[cut:])


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(VALID), st.data())
def test_mutated_metadata_with_valid_checksum(payload: bytes, data: st.DataObject) -> None:
    """Re-sign mutated metadata so the checksum passes and the decoder itself is tested."""
    import json
    import struct

    from msight_core.data._codec import pack, unpack

    tag, meta, views = unpack(payload)
    text = json.dumps(meta)
    pos = data.draw(st.integers(0, max(len(text) - 1, 0)))
    char = data.draw(st.sampled_from(list('[]{}",:0123456789-.$abdfgstDeE ') + ["null", "true"]))
    mutated = text[:pos] + char + text[pos + 1 :]
    try:
        new_meta = json.loads(mutated)
    except ValueError:
        return
    if not isinstance(new_meta, dict):
        return
    new_tag = data.draw(st.sampled_from([tag, "ImageData", "SensorData", "nope", "Data"]))
    _decode_or_error(pack(new_tag, new_meta, views))
    assert struct  # keep the import used
