"""Data types: sensor messages that turn into bytes and back, fast and safely.

- :class:`Data`: base of every message; subclasses register themselves.
- :class:`SensorData`: sensor name, frame id, capture timestamp, metadata.
- :class:`ImageData`: a numpy frame, or encoded JPEG/PNG bytes.
- :class:`PointCloudData`: an ``(N, K)`` array with column names.
- :class:`DetectionResult`: boxes, classes, scores and track ids of one frame.
- :class:`BytesData`: an opaque payload.

Example::

    from msight_core.data import Data, SensorData

    payload = SensorData(sensor_name="camera1", frame_id=12345).serialize()
    data = Data.deserialize(payload)   # -> SensorData

The wire format (a versioned header, JSON metadata, raw array buffers) is
described in :mod:`msight_core.data._codec`. Nothing is pickled, and no class
named in a message is ever imported: only registered subclasses are built.
"""

from __future__ import annotations

from .base import Data, SensorData, generate_frame_id, get_data_type, registered_data_types
from .bytes import BytesData
from .detection_result import BOX_FORMATS, DetectionResult
from .image import ENCODED_FORMATS, ImageData
from .pointcloud import PointCloudData

__all__ = [
    "BOX_FORMATS",
    "ENCODED_FORMATS",
    "BytesData",
    "Data",
    "DetectionResult",
    "ImageData",
    "PointCloudData",
    "SensorData",
    "generate_frame_id",
    "get_data_type",
    "registered_data_types",
]
