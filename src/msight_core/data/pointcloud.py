"""Point clouds: an ``(N, K)`` array with one name per column."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .base import SensorData

__all__ = ["PointCloudData"]

_DEFAULT_NAMES = {3: ("x", "y", "z"), 4: ("x", "y", "z", "intensity")}


@dataclass(eq=False)
class PointCloudData(SensorData):
    """A lidar/depth point cloud as one numeric ``(N, K)`` array.

    Travels as its raw buffer and comes back as a zero-copy read-only view (no
    compression: on a LAN, copying 2 MB is cheaper than zstd'ing it).

    Attributes:
        points: ``(N, K)`` numbers, one row per point.
        field_names: name of each column; defaults to ``x, y, z`` for K=3 and
            ``x, y, z, intensity`` for K=4, required otherwise.

    Raises:
        TypeError, ValueError: points not a 2-D numeric array, or names that do
            not match its columns. Use :meth:`from_structured` for structured arrays.
    """

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32), repr=False)
    field_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        pts = self.points
        if not isinstance(pts, np.ndarray):
            pts = self.points = np.asarray(pts, dtype=np.float32)
        if pts.dtype.names is not None:
            raise TypeError(
                "PointCloudData.points is a structured array: use "
                "PointCloudData.from_structured(points) to convert it to (N, K)"
            )
        if pts.ndim != 2 or pts.dtype.kind not in "biuf":
            raise ValueError(
                f"PointCloudData.points must be (N, K) numbers, got shape {pts.shape} "
                f"dtype {pts.dtype}"
            )
        names = self.field_names
        if names is None:
            names = _DEFAULT_NAMES.get(pts.shape[1])
            if names is None:
                raise ValueError(f"points have {pts.shape[1]} columns: pass field_names for them")
        names = tuple(names)
        if len(names) != pts.shape[1] or not all(isinstance(n, str) and n for n in names):
            raise ValueError(
                f"field_names {names!r} must be {pts.shape[1]} non-empty strings, one per column"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"field_names {names!r} has duplicates")
        self.field_names = names

    @property
    def num_points(self) -> int:
        return int(self.points.shape[0])

    def column(self, name: str) -> np.ndarray:
        """The column called ``name`` (a view).

        Raises:
            KeyError: no such column.
        """
        try:
            index = self.field_names.index(name)  # type: ignore[union-attr]
        except ValueError:
            raise KeyError(f"no column {name!r}; columns are {self.field_names}") from None
        return self.points[:, index]

    @property
    def xyz(self) -> np.ndarray:
        """The ``(N, 3)`` x, y, z columns (a copy unless they are the first three)."""
        if self.field_names[:3] == ("x", "y", "z"):  # type: ignore[index]
            return self.points[:, :3]
        return np.stack([self.column("x"), self.column("y"), self.column("z")], axis=1)

    @classmethod
    def from_structured(cls, points: np.ndarray, **fields: Any) -> PointCloudData:
        """Convert a structured array (msight-core 2.x's layout) to ``(N, K)``.

        The columns take the common dtype of the structured fields.
        """
        if points.dtype.names is None:
            return cls(points=points, **fields)
        names = points.dtype.names
        dtype = np.result_type(*(points.dtype.fields[n][0] for n in names))
        flat = points.reshape(-1)
        out = np.empty((flat.shape[0], len(names)), dtype=dtype)
        for i, n in enumerate(names):
            out[:, i] = flat[n]
        return cls(points=out, field_names=names, **fields)

    @classmethod
    def from_ndarray(
        cls,
        points: np.ndarray,
        sensor_name: str | None = None,
        capture_timestamp: float | None = None,
        creation_timestamp: float | None = None,
        **fields: Any,
    ) -> PointCloudData:
        """msight-core 2.x constructor: ``(N, K)`` or structured points."""
        now = time.time()
        return cls.from_structured(
            points,
            sensor_name=sensor_name,
            capture_timestamp=now if capture_timestamp is None else capture_timestamp,
            creation_timestamp=now if creation_timestamp is None else creation_timestamp,
            **fields,
        )

    def to_structured(self) -> np.ndarray:
        """A structured array with one named field per column (a copy)."""
        dtype = np.dtype([(n, self.points.dtype) for n in self.field_names])  # type: ignore[union-attr]
        out = np.empty(self.points.shape[0], dtype=dtype)
        for i, n in enumerate(self.field_names):  # type: ignore[arg-type]
            out[n] = self.points[:, i]
        return out
