"""Opaque binary payloads with the shared sensor fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import SensorData

__all__ = ["BytesData"]


@dataclass(eq=False)
class BytesData(SensorData):
    """An opaque payload (a raw lidar packet, a protobuf, a compressed blob).

    Attributes:
        data: the payload; ``bytearray``/``memoryview`` are copied to ``bytes``.

    Raises:
        TypeError: ``data`` is not bytes-like.
    """

    data: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if type(self.data) is not bytes:
            if not isinstance(self.data, (bytes, bytearray, memoryview)):
                raise TypeError(f"BytesData.data must be bytes, got {type(self.data).__name__}")
            self.data = bytes(self.data)
