"""The :class:`Data` base class, its type registry and :class:`SensorData`.

Every subclass registers itself under a type tag (its class name unless given
``tag=...``) when it is defined; :meth:`Data.deserialize` finds the class by that
tag in the registry and nowhere else: nothing named in a message is ever
imported, and nothing is unpickled.

A message is untrusted. Decoding one of N bytes allocates at most a small constant
times N plus a fixed bound, and every length, size, count or index it holds is
checked against the bytes present before anything is allocated (see
:mod:`msight_core.data._codec`). Every decoded field value is checked against the
field's annotation before the class is built (:mod:`msight_core.data._fieldcheck`),
then the class's ``__post_init__`` validates the rest. Whatever goes wrong is a
:class:`~msight_core.errors.DeserializationError`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, TypeVar

import numpy as np

from ..errors import DeserializationError, SerializationError
from ._codec import Decoder, Encoder, pack, pack_into, packed_size, unpack
from ._fieldcheck import Check, field_checks

__all__ = ["Data", "SensorData", "generate_frame_id", "get_data_type", "registered_data_types"]

T = TypeVar("T", bound="Data")

_registry: dict[str, type[Data]] = {}
_registry_lock = threading.Lock()
_MAX_TAG = 255


def _register(cls: type[Data], tag: str) -> None:
    if type(tag) is not str or not 1 <= len(tag.encode("utf-8")) <= _MAX_TAG:
        raise TypeError(f"data type tag must be a str of 1-{_MAX_TAG} bytes, got {tag!r}")
    with _registry_lock:
        old = _registry.get(tag)
        if old is not None and (old.__module__, old.__qualname__) != (
            cls.__module__,
            cls.__qualname__,
        ):
            raise TypeError(
                f"data type tag {tag!r} of {cls.__module__}.{cls.__qualname__} is already "
                f"used by {old.__module__}.{old.__qualname__}; pick another with "
                f"class {cls.__name__}(..., tag='unique.name')"
            )
        # Same module and qualname: a redefinition (reload, dataclass(slots=True)); replace.
        _registry[tag] = cls
        cls.__data_tag__ = tag


def get_data_type(tag: str) -> type[Data] | None:
    """The registered :class:`Data` subclass for ``tag``, or ``None``. Thread-safe."""
    return _registry.get(tag)


def registered_data_types() -> dict[str, type[Data]]:
    """A copy of the registry: type tag -> class."""
    with _registry_lock:
        return dict(_registry)


class _Schema:
    __slots__ = ("_plan", "cls", "init", "late")

    def __init__(self, cls: type) -> None:
        own = inspect.get_annotations(cls)
        if "__dataclass_fields__" not in cls.__dict__ and any(
            not str(a).replace("typing.", "").startswith("ClassVar") for a in own.values()
        ):
            raise SerializationError(
                f"{cls.__name__} declares fields but is not a dataclass: decorate it "
                "with @dataclass (or @dataclass(eq=False) for array-aware ==)"
            )
        fs = dataclasses.fields(cls)
        self.cls = cls
        self.init = [f.name for f in fs if f.init]
        self.late = [f.name for f in fs if not f.init]
        self._plan: list[tuple[str, bool, Check | None, str]] | None = None

    def plan(self) -> list[tuple[str, bool, Check | None, str]]:
        """(name, is an __init__ argument, type check, expected type) of each field."""
        # Resolved on first decode, not at class creation: annotations may name
        # classes defined later in the module.
        if self._plan is None:
            checks = field_checks(self.cls, Data)
            self._plan = [
                (name, name in self.init, *checks.get(name, (None, "")))
                for name in (*self.init, *self.late)
            ]
        return self._plan


def _schema(cls: type) -> _Schema:
    schema = cls.__dict__.get("_msight_schema")
    if schema is None:
        schema = _Schema(cls)
        cls._msight_schema = schema  # type: ignore[attr-defined]
    return schema


def _data_fields(obj: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(obj, Data):
        raise TypeError("not a Data instance")
    s = _schema(type(obj))
    return type(obj).__data_tag__, {n: getattr(obj, n) for n in (*s.init, *s.late)}


def _build(tag: str, encoded: Any, depth: int, decoder: Decoder, base: type = object) -> Any:
    cls = _registry.get(tag)
    if cls is None:
        raise DeserializationError(
            f"unknown data type tag {tag[:80]!r}: define or import that Data subclass "
            "in this process before deserializing"
        )
    if not issubclass(cls, base):
        raise DeserializationError(f"the message holds a {tag!r} value, not a {base.__name__}")
    if type(encoded) is not dict:
        raise DeserializationError(f"fields of {tag!r} are not a JSON object")
    kwargs: dict[str, Any] = {}
    late: dict[str, Any] = {}
    # Fields the sender has and we do not are never looked at (newer senders stay
    # readable); fields we have and it does not keep their defaults.
    for name, is_init, check, expected in _schema(cls).plan():
        if name in encoded:
            value = encoded[name]
            if type(value) is dict or type(value) is list:  # scalars decode to themselves
                value = decoder.value(value, depth + 1)
            if check is not None and not check(value):
                raise DeserializationError(
                    f"{tag[:80]}.{name} is a {type(value).__name__}, expected {expected}"
                )
            (kwargs if is_init else late)[name] = value
    obj = cls(**kwargs)
    for name, value in late.items():
        object.__setattr__(obj, name, value)
    return obj


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, np.generic) and a.dtype.kind in "fc" and np.isnan(a):
        return bool(np.isnan(b))
    return bool(a == b)


@dataclass(eq=False)
class Data:
    """Base class of every msight message: a dataclass that turns into bytes and back.

    Subclass it with ``@dataclass`` and any fields made of ``None``, ``bool``,
    ``int``, ``float``, ``str``, ``bytes``, lists, tuples and dicts of those,
    numpy arrays and scalars of numeric dtypes, and other :class:`Data` values.
    The subclass registers itself under its class name (or ``tag=...``)::

        @dataclass(eq=False)
        class Reading(Data, tag="acme.reading"):
            value: float = 0.0
            samples: np.ndarray | None = None

    ``@dataclass(eq=False)`` keeps this class's ``==``, which compares arrays by
    value (and NaN equal to NaN); the dataclass default ``==`` fails on arrays.
    """

    __data_tag__: ClassVar[str]

    def __init_subclass__(cls, tag: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _register(cls, cls.__name__ if tag is None else tag)

    def serialize(self) -> bytes:
        """Encode to bytes: metadata as JSON, arrays and bytes appended as they are.

        Each array is copied once, into the message (twice if it is not
        C-contiguous). Thread-safe as long as no other thread mutates the value
        meanwhile.

        Raises:
            SerializationError: a field holds a value of an unsupported type.
        """
        encoder = Encoder(_data_fields)
        tag, values = _data_fields(self)
        meta = encoder.fields(values, type(self).__name__)
        return pack(tag, meta, encoder.buffers)

    def serialized_size(self) -> int:
        """The size in bytes of :meth:`serialize`'s result, without building it.

        Raises:
            SerializationError: as :meth:`serialize`.
        """
        encoder = Encoder(_data_fields)
        tag, values = _data_fields(self)
        return packed_size(tag, encoder.fields(values, type(self).__name__), encoder.buffers)

    def serialize_into(self, buffer: bytearray | memoryview) -> int:
        """Write :meth:`serialize`'s bytes at the start of ``buffer``; return how many.

        For a frame built straight in memory a backend lends, with no
        intermediate ``bytes`` (the shared-memory backend's loans)::

            with backend.loan("camera1.frames", image.serialized_size()) as buf:
                image.serialize_into(buf)

        Each array is copied once, into ``buffer``.

        Raises:
            TypeError: ``buffer`` is not a writable bytes-like object.
            ValueError: ``buffer`` is smaller than the message.
            SerializationError: as :meth:`serialize`.
        """
        encoder = Encoder(_data_fields)
        tag, values = _data_fields(self)
        meta = encoder.fields(values, type(self).__name__)
        return pack_into(buffer, tag, meta, encoder.buffers)

    @classmethod
    def deserialize(cls: type[T], data: bytes | bytearray | memoryview) -> T:  # noqa: PYI019
        """Decode bytes made by :meth:`serialize` into the registered class they name.

        ``Data.deserialize`` returns whatever type the message holds;
        ``SomeType.deserialize`` also accepts subclasses of ``SomeType`` and refuses
        everything else. Arrays are read-only views over ``data`` (zero-copy); with a
        ``bytearray`` they are writable and share its memory.

        Raises:
            TypeError: ``data`` is not bytes-like.
            DeserializationError: the bytes are not a valid message, name an unknown
                type, hold another type than ``cls``, or fail the type's validation.
        """
        tag, meta, views = unpack(data)
        decoder = Decoder(views, lambda t, f, d: _build(t, f, d, decoder, Data))
        try:
            return _build(tag, meta, 0, decoder, cls)  # type: ignore[no-any-return]
        except DeserializationError:
            raise
        except Exception as exc:  # anything a malformed message provokes, user code included
            text = str(exc)
            text = text if len(text) <= 200 else text[:197] + "..."
            raise DeserializationError(
                f"invalid {tag[:80]!r} message: {type(exc).__name__}: {text}"
            ) from exc
        finally:
            # The decoder and its build callback refer to each other: without this the
            # cycle would keep the buffer views (and a shared-memory sample) alive
            # until the next garbage collection.
            decoder.release()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(
            _equal(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable value object


_register(Data, "Data")

# -- frame ids --------------------------------------------------------------------

_EPOCH_MS = 1_577_836_800_000  # 2020-01-01T00:00:00Z
_id_lock = threading.Lock()
_id_last = [0, 0]  # last millisecond, sequence


def generate_frame_id() -> int:
    """A unique 63-bit id: milliseconds since 2020 | 10 bits of pid | 12-bit sequence.

    Increasing within a process (Snowflake-like, as in msight-core 2.x, without the
    dependency). Thread-safe.
    """
    with _id_lock:
        now = time.time_ns() // 1_000_000 - _EPOCH_MS
        if now <= _id_last[0]:
            now = _id_last[0]
            seq = (_id_last[1] + 1) & 0xFFF
            if seq == 0:  # 4096 ids in one millisecond: borrow the next one
                now += 1
        else:
            seq = 0
        _id_last[0], _id_last[1] = now, seq
    return (now << 22) | ((os.getpid() % 1024) << 12) | seq


@dataclass(kw_only=True, eq=False)
class SensorData(Data):
    """Fields every sensor message shares (keyword-only, all with defaults).

    Attributes:
        sensor_name: the sensor that produced the data (``camera1``).
        frame_id: unique id of this frame (default: :func:`generate_frame_id`).
        capture_timestamp: POSIX seconds when the sensor captured it (default: now);
            nodes measure end-to-end latency from it.
        creation_timestamp: POSIX seconds when this object was made (default: now).
        device_name: the edge device the data comes from.
        metadata: free JSON-like values (and arrays) for anything else.
    """

    sensor_name: str | None = None
    frame_id: int = field(default_factory=generate_frame_id)
    capture_timestamp: float = field(default_factory=time.time)
    creation_timestamp: float = field(default_factory=time.time)
    device_name: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def time(self) -> str:
        """ISO 8601 local time of ``capture_timestamp``."""
        return datetime.fromtimestamp(self.capture_timestamp).isoformat()

    capture_time = time

    @property
    def creation_time(self) -> str:
        """ISO 8601 local time of ``creation_timestamp``."""
        return datetime.fromtimestamp(self.creation_timestamp).isoformat()

    def age(self, now: float | None = None) -> float:
        """Seconds since capture (end-to-end latency when called on receipt)."""
        return (time.time() if now is None else now) - self.capture_timestamp
