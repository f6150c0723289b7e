"""Detection results: boxes, classes, scores and optional track ids of one frame."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .base import SensorData

__all__ = ["BOX_FORMATS", "DetectionResult"]

#: Box layouts: corners, corner + size, centre + size (all in pixels or metres).
BOX_FORMATS = ("xyxy", "xywh", "cxcywh")


def _column(value: Any, name: str, kinds: str, default: type) -> np.ndarray:
    arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    if arr.size == 0 and arr.dtype.kind not in kinds:
        arr = arr.astype(default)
    if arr.dtype.kind not in kinds:
        raise TypeError(
            f"DetectionResult.{name} must hold numbers of kind {kinds!r}, got {arr.dtype}"
        )
    return arr


@dataclass(eq=False)
class DetectionResult(SensorData):
    """Objects detected in one frame; row ``i`` of every array is detection ``i``.

    Lists are accepted and turned into arrays. ``sensor_name``/``capture_timestamp``
    usually carry over from the frame the detections come from, so end-to-end
    latency is measured from the capture.

    Attributes:
        boxes: ``(N, 4)`` floats in ``box_format``.
        classes: ``(N,)`` integer class ids.
        scores: ``(N,)`` float confidences.
        track_ids: ``(N,)`` integer track ids, or ``None`` when not tracked.
        class_names: optional names indexed by class id.
        box_format: one of :data:`BOX_FORMATS`.
        source_frame_id: ``frame_id`` of the image the detections come from.

    Raises:
        TypeError, ValueError: arrays of the wrong kind, shape or length.
    """

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    track_ids: np.ndarray | None = None
    class_names: list[str] | None = None
    box_format: str = "xyxy"
    source_frame_id: int | None = None

    def __post_init__(self) -> None:
        self.boxes = _column(self.boxes, "boxes", "fiu", np.float32)
        if self.boxes.size == 0 and self.boxes.ndim == 1:
            self.boxes = self.boxes.reshape(0, 4)
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4:
            raise ValueError(f"DetectionResult.boxes must be (N, 4), got {self.boxes.shape}")
        n = self.boxes.shape[0]
        self.classes = _column(self.classes, "classes", "iu", np.int64)
        self.scores = _column(self.scores, "scores", "f", np.float32)
        if self.track_ids is not None:
            self.track_ids = _column(self.track_ids, "track_ids", "iu", np.int64)
        for name in ("classes", "scores", "track_ids"):
            arr = getattr(self, name)
            if arr is not None and arr.shape != (n,):
                raise ValueError(
                    f"DetectionResult.{name} must have shape ({n},) like boxes, got {arr.shape}"
                )
        if self.box_format not in BOX_FORMATS:
            raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {self.box_format!r}")
        if self.class_names is not None:
            self.class_names = list(self.class_names)
            if not all(isinstance(c, str) for c in self.class_names):
                raise TypeError("DetectionResult.class_names must be strings")

    @property
    def num_detections(self) -> int:
        """Number of detections ``N``."""
        return int(self.boxes.shape[0])

    def labels(self) -> list[str]:
        """Class names of each detection (the id as text when no name is known)."""
        names = self.class_names or []
        return [names[c] if 0 <= c < len(names) else str(c) for c in self.classes.tolist()]
