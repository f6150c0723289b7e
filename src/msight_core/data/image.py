"""Camera frames: a numpy image, or already-encoded JPEG/PNG bytes."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .base import SensorData
from .detection_result import DetectionResult

__all__ = ["ENCODED_FORMATS", "ImageData"]

#: Encoded formats ImageData knows by name ("raw" means a numpy array).
ENCODED_FORMATS = ("jpeg", "png")
_ALIASES = {"jpg": "jpeg", ".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png"}


def _codec_missing() -> ImportError:
    return ImportError(
        "encoding or decoding JPEG/PNG needs OpenCV or Pillow: "
        "pip install opencv-python-headless (or pillow)"
    )


@dataclass(eq=False)
class ImageData(SensorData):
    """One camera frame.

    Either ``image`` is a numpy array (``(H, W)`` or ``(H, W, C)``, any numeric
    dtype) and ``format`` is ``"raw"``; it travels as its raw buffer and comes back
    as a zero-copy read-only view. Or ``image`` is encoded bytes and ``format``
    names the encoding (``"jpeg"``, ``"png"``, or another lowercase name).

    Attributes:
        image: the pixels or the encoded bytes (``None`` for an empty frame).
        format: ``"raw"`` for an array, else the encoding of the bytes.
        detection_results: detections attached to this frame, if any.

    Raises:
        TypeError, ValueError: an image of the wrong type or shape for ``format``.
    """

    image: np.ndarray | bytes | None = field(default=None, repr=False)
    format: str = "raw"
    detection_results: DetectionResult | None = None

    def __post_init__(self) -> None:
        fmt = self.format
        if not isinstance(fmt, str) or not fmt:
            raise TypeError("ImageData.format must be a non-empty str")
        self.format = fmt = _ALIASES.get(fmt.lower(), fmt.lower())
        img = self.image
        if img is None:
            pass
        elif isinstance(img, np.ndarray):
            if fmt != "raw":
                raise ValueError(
                    f"format={fmt!r} needs encoded bytes; a numpy image has format='raw'"
                )
            if img.ndim not in (2, 3) or img.dtype.kind not in "biuf":
                raise ValueError(
                    f"a raw image must be (H, W) or (H, W, C) numbers, got shape {img.shape} "
                    f"dtype {img.dtype}"
                )
        elif isinstance(img, (bytes, bytearray, memoryview)):
            if fmt == "raw":
                raise ValueError(
                    "encoded image bytes need their format (format='jpeg' or 'png'); "
                    "raw pixels go in a numpy array"
                )
            if type(img) is not bytes:
                self.image = bytes(img)
        else:
            raise TypeError(
                f"ImageData.image must be a numpy array or bytes, got {type(img).__name__}"
            )
        if self.detection_results is not None and not isinstance(
            self.detection_results, DetectionResult
        ):
            raise TypeError("ImageData.detection_results must be a DetectionResult")

    @property
    def is_encoded(self) -> bool:
        """True when ``image`` holds encoded bytes (msight-core 2.x name)."""
        return self.format != "raw"

    @property
    def shape(self) -> tuple[int, ...] | None:
        """Shape of a raw image (``None`` for encoded or empty frames)."""
        return self.image.shape if isinstance(self.image, np.ndarray) else None

    size = shape  # msight-core 2.x name

    @classmethod
    def from_ndarray(
        cls,
        image: np.ndarray,
        sensor_name: str | None = None,
        capture_timestamp: float | None = None,
        creation_timestamp: float | None = None,
        is_encoded: bool = False,
        detection_results: DetectionResult | None = None,
        jpeg_quality: int = 90,
        **fields: Any,
    ) -> ImageData:
        """An ImageData from a numpy image, raw or (``is_encoded=True``) as JPEG.

        Unlike msight-core 2.x, frames stay raw unless ``is_encoded`` is set: raw
        frames cost nothing to encode and decode; JPEG needs OpenCV or Pillow.

        Raises:
            ImportError: ``is_encoded`` without OpenCV or Pillow installed.
        """
        now = time.time()
        data: np.ndarray | bytes = image
        fmt = "raw"
        if is_encoded:
            data, fmt = _encode_jpeg(image, jpeg_quality), "jpeg"
        return cls(
            image=data,
            format=fmt,
            sensor_name=sensor_name,
            capture_timestamp=now if capture_timestamp is None else capture_timestamp,
            creation_timestamp=now if creation_timestamp is None else creation_timestamp,
            detection_results=detection_results,
            **fields,
        )

    def to_ndarray(self) -> np.ndarray:
        """The pixels: the array itself, or decoded from JPEG/PNG (BGR, as OpenCV).

        Raises:
            ValueError: no image, or bytes that do not decode.
            ImportError: encoded bytes without OpenCV or Pillow installed.
        """
        if self.image is None:
            raise ValueError("this ImageData has no image")
        if isinstance(self.image, np.ndarray):
            return self.image
        return _decode(self.image)

    @property
    def decoded_image(self) -> np.ndarray:
        """Same as :meth:`to_ndarray`."""
        return self.to_ndarray()


def _encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is not None:
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:
            raise ValueError("OpenCV could not encode this image as JPEG")
        return bytes(buf.tobytes())
    try:
        from PIL import Image
    except ImportError:
        raise _codec_missing() from None
    out = io.BytesIO()
    rgb = image[..., ::-1] if image.ndim == 3 and image.shape[2] == 3 else image
    Image.fromarray(np.ascontiguousarray(rgb)).save(out, format="JPEG", quality=int(quality))
    return out.getvalue()


def _decode(data: bytes) -> np.ndarray:
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is not None:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise ValueError("the image bytes could not be decoded")
        return img  # type: ignore[no-any-return]
    try:
        from PIL import Image
    except ImportError:
        raise _codec_missing() from None
    try:
        arr = np.asarray(Image.open(io.BytesIO(data)))
    except Exception as exc:
        raise ValueError(f"the image bytes could not be decoded: {exc}") from exc
    return arr[..., ::-1] if arr.ndim == 3 and arr.shape[2] == 3 else arr
