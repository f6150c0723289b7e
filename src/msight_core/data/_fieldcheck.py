"""Decode-time type checks of Data fields, derived from their annotations (private).

A message names its fields' values; nothing stops a peer from sending
``"capture_timestamp": "evil"``. Before a class is built from a message, every
decoded field value is checked against the field's annotation, nested values
included (``list[str]``, ``dict[str, Any]``, ``tuple[str, ...]``, ``X | None``).

What is checked is what the codec can carry: ``None``, ``bool``, ``int``,
``float``, ``complex``, ``str``, ``bytes``, lists, tuples, dicts, numpy arrays and
scalars, :class:`~msight_core.data.Data` values, ``Literal`` and ``Enum`` values
(an enum travels as its value). Numbers follow the numeric tower (an ``int`` that
fits a float, or a numpy integer, is a valid ``float``; a ``bool`` is not a number
here). ``Any``, ``object``, type variables, annotations that do not resolve and
classes the codec never produces are not checked: a class validates those in
``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import sys
import types
import typing
from collections import abc
from collections.abc import Callable
from itertools import repeat
from typing import Any

import numpy as np

__all__ = ["Check", "describe", "field_checks"]

Check = Callable[[Any], bool]

_NUMBER = (int, float, complex, np.number)
_FLOAT_MAX = sys.float_info.max


def field_checks(cls: type, data_base: type) -> dict[str, tuple[Check, str]]:
    """``{field name: (check, expected type as text)}`` for the checked fields of ``cls``.

    ``data_base`` is the :class:`~msight_core.data.Data` class (passed in: this
    module does not import its caller).
    """
    hints = _hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        annotation = hints.get(f.name, Any)
        check = compile_check(annotation, data_base)
        if check is not None:
            out[f.name] = (check, describe(annotation))
    return out


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - e.g. a name local to a function: resolve per field
        return _hints_per_field(cls)


def _hints_per_field(cls: type) -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        module = sys.modules.get(klass.__module__)
        globalns = dict(vars(module)) if module is not None else {}
        for name, annotation in inspect.get_annotations(klass).items():
            if isinstance(annotation, str):
                try:
                    # The class's own source text, never anything from a message,
                    # resolved as inspect resolves string annotations.
                    def holder() -> None:  # a fresh carrier: thread-safe
                        pass

                    holder.__annotations__ = {name: annotation}
                    annotation = inspect.get_annotations(
                        holder, eval_str=True, globals=globalns, locals=dict(vars(klass))
                    )[name]
                except Exception:  # noqa: BLE001 - unresolvable: left unchecked
                    annotation = Any
            hints[name] = annotation
    return hints


def describe(annotation: Any) -> str:
    """Short text for an annotation (``float``, ``list[str] | None``)."""
    if annotation is None or annotation is type(None):
        return "None"
    if annotation is Ellipsis:
        return "..."
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(describe(a) for a in args)
    if origin is not None and args and origin is not typing.Literal:
        return f"{describe(origin)}[{', '.join(describe(a) for a in args)}]"
    if isinstance(annotation, type):
        return annotation.__qualname__
    return str(annotation).replace("typing.", "")


def compile_check(annotation: Any, data_base: type) -> Check | None:
    """A predicate for values of ``annotation``, or ``None`` when it is not checked."""
    if annotation is None or annotation is type(None):
        return _instance_of(type(None))
    if annotation is Any or annotation is object or isinstance(annotation, typing.TypeVar):
        return None
    supertype = getattr(annotation, "__supertype__", None)  # typing.NewType
    if supertype is not None:
        return compile_check(supertype, data_base)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return compile_check(args[0], data_base)
    if origin is typing.Union or origin is types.UnionType:
        return _union([compile_check(a, data_base) for a in args])
    if origin is typing.Literal:
        return lambda v: any(type(v) is type(a) and v == a for a in args)
    if origin is not None:
        return _generic(origin, args, data_base)
    if isinstance(annotation, type):
        return _class(annotation, data_base)
    return None  # a string that did not resolve, a ForwardRef, ...


# Decoding runs these for every field of every message: the common cases (a class,
# ``X | None``, ``list[str]``, ``dict[str, Any]``) are single isinstance() calls or
# C-level loops, not generators.


def _instance_of(*classes: type) -> Check:
    def check(v: Any) -> bool:
        return isinstance(v, classes)

    check.classes = classes  # type: ignore[attr-defined]  # lets unions and items merge it
    return check


def _classes(check: Check) -> tuple[type, ...] | None:
    return getattr(check, "classes", None)


def _union(checks: list[Check | None]) -> Check | None:
    if any(c is None for c in checks):
        return None
    simple = tuple(t for c in checks for t in (_classes(c) or ()))  # type: ignore[arg-type]
    others = [c for c in checks if _classes(c) is None]  # type: ignore[arg-type]
    if not others:
        return _instance_of(*simple)
    if len(others) == 1:
        other = others[0]
        return lambda v: isinstance(v, simple) or other(v)  # type: ignore[misc]
    return lambda v: isinstance(v, simple) or any(c(v) for c in others)  # type: ignore[misc]


def _outer_and_each(outer: Check, item: Check | None) -> Check:
    """``outer(v)`` and every element of ``v`` passes ``item``."""
    each = _each(item)
    if each is None:
        return outer
    oc, ic = _classes(outer), _classes(item)  # type: ignore[arg-type]
    if oc is not None and ic is not None:
        return lambda v: isinstance(v, oc) and all(map(isinstance, v, repeat(ic)))
    return lambda v: outer(v) and each(v)


def _each(item: Check | None) -> Callable[[Any], bool] | None:
    """A check that every element of an iterable passes ``item``."""
    if item is None:
        return None
    classes = _classes(item)
    if classes is not None:
        return lambda xs: all(map(isinstance, xs, repeat(classes)))
    return lambda xs: all(map(item, xs))


def _is_real(v: Any) -> bool:
    if isinstance(v, (float, np.floating, np.integer)):
        return True
    # An int too large for a float would fail the first arithmetic done with it.
    return isinstance(v, int) and not isinstance(v, bool) and abs(v) <= _FLOAT_MAX


def _class(cls: type, data_base: type) -> Check | None:
    if cls is bool or issubclass(cls, np.bool_):
        return _instance_of(bool, np.bool_)
    if issubclass(cls, enum.Enum):
        values = [m.value for m in cls]
        return lambda v: any(type(v) is type(x) and v == x for x in values)
    if cls is int or issubclass(cls, np.integer):
        return lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)
    if cls is float or issubclass(cls, np.floating):
        return _is_real
    if cls is complex or issubclass(cls, np.number):
        return lambda v: isinstance(v, _NUMBER) and not isinstance(v, bool)
    if cls in (bytearray, memoryview):
        return _instance_of(bytes)  # bytes-like fields arrive as bytes
    if _produced(cls, data_base):
        return _instance_of(cls)
    return None


def _produced(cls: type, data_base: type) -> bool:
    """Whether the decoder can return an instance of ``cls`` (else: not checked)."""
    if issubclass(cls, (data_base, np.ndarray, np.generic)):
        return True
    return any(
        issubclass(t, cls)
        for t in (type(None), bool, int, float, str, bytes, list, tuple, dict, np.ndarray)
    )


def _generic(origin: Any, args: tuple[Any, ...], data_base: type) -> Check | None:
    if not isinstance(origin, type):
        return None
    outer = _class(origin, data_base)
    if outer is None or not args:
        return outer
    if issubclass(origin, abc.Mapping):
        key = compile_check(args[0], data_base)
        values = _each(compile_check(args[1], data_base) if len(args) > 1 else None)
        if values is None:
            return _outer_and_each(outer, key)  # iterating a mapping gives its keys
        keys = _each(key)
        return lambda v: (
            outer(v) and (keys is None or keys(v)) and (values is None or values(v.values()))
        )
    if issubclass(origin, tuple):
        if len(args) == 2 and args[1] is Ellipsis:
            return _outer_and_each(outer, compile_check(args[0], data_base))
        if args == ((),):  # tuple[()]
            return lambda v: outer(v) and len(v) == 0
        items = [compile_check(a, data_base) for a in args]
        return lambda v: (
            outer(v) and len(v) == len(items) and all(c is None or c(x) for c, x in zip(items, v))
        )
    if issubclass(origin, np.ndarray):
        return outer  # np.ndarray[shape, dtype]: the codec already checks dtype and size
    if issubclass(origin, abc.Iterable) and len(args) == 1:
        return _outer_and_each(outer, compile_check(args[0], data_base))
    return outer
