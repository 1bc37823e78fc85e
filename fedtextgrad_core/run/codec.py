"""One codec for every typed record that crosses a boundary: Flower messages and JSON files.

Records are frozen dataclasses of numbers, text, booleans, tuples of records and nested
records. ``to_plain`` turns one into nested dicts (JSON as it is written to disk),
``flatten`` turns that into one level of ``"a.b": value`` pairs (what a Flower
``ConfigRecord`` holds: no ``None``, no nesting), and ``from_plain`` / ``unflatten`` go
back, refusing a missing or mistyped field with a message that names it. The records
themselves say nothing about Flower or files, so the core stays free of both.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from fedtextgrad_core.errors import FedTextGradError

T = TypeVar("T")


class MalformedRecord(FedTextGradError):
    """A message or file does not hold the record it should (a field is missing or of the wrong type)."""


def to_plain(record: Any) -> Any:
    """Nested dicts and lists of a record, JSON-ready; ``None`` stays ``None``."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return {f.name: to_plain(getattr(record, f.name)) for f in dataclasses.fields(record)}
    if isinstance(record, (list, tuple)):
        return [to_plain(item) for item in record]
    if isinstance(record, Mapping):
        return {str(key): to_plain(value) for key, value in record.items()}
    return record


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The resolved field types of a record class (resolved once: it costs a module lookup)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _is_optional(kind: Any) -> bool:
    return type(None) in typing.get_args(kind)


def _build(kind: Any, value: Any, where: str) -> Any:
    """``value`` as ``kind``: a dataclass, a scalar, an Optional, a tuple/list or a dict."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if value is None:
            return None
        errors = []
        for option in options:
            try:
                return _build(option, value, where)
            except MalformedRecord as exc:
                errors.append(str(exc))
        raise MalformedRecord(errors[0])
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        if not isinstance(value, Mapping):
            raise MalformedRecord(f"{where} is not a record")
        return from_plain(kind, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise MalformedRecord(f"{where} is not a list")
        item_kind = typing.get_args(kind)[0] if typing.get_args(kind) else Any
        items = [_build(item_kind, item, f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or kind is dict:
        if not isinstance(value, Mapping):
            raise MalformedRecord(f"{where} is not a record")
        args = typing.get_args(kind)
        value_kind = args[1] if len(args) == 2 else Any
        return {str(k): _build(value_kind, v, f"{where}.{k}") for k, v in value.items()}
    if kind is Any:
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MalformedRecord(f"{where} is not a number")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise MalformedRecord(f"{where} is not a whole number")
        return int(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise MalformedRecord(f"{where} is not true or false")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise MalformedRecord(f"{where} is not text")
        return value
    return value


def from_plain(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """The record ``cls`` from nested dicts. A field that is absent takes its default, or ``None``
    when it may be ``None``; otherwise the record is refused, naming the field."""
    values = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = _hints(cls)[field.name]
        path = f"{where}.{field.name}" if where else field.name
        if field.name in data:
            values[field.name] = _build(kind, data[field.name], path)
        elif field.default is not dataclasses.MISSING:
            values[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            values[field.name] = field.default_factory()
        elif _is_optional(kind):
            values[field.name] = None
        else:
            raise MalformedRecord(f"missing {path}")
    return cls(**values)


def flatten(plain: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; ``None`` values are left out (Flower records hold none).

    Lists must hold scalars of one type (as a Flower ``ConfigRecord`` does); a list of records
    has no flat form and is refused.
    """
    flat: dict[str, Any] = {}
    for key, value in plain.items():
        name = f"{prefix}{key}"
        if value is None:
            continue
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and any(isinstance(item, (Mapping, list)) for item in value):
            raise TypeError(f"{name}: a list of records has no flat form")
        else:
            flat[name] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    plain: dict[str, Any] = {}
    for key, value in flat.items():
        parts = str(key).split(".")
        node = plain
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise MalformedRecord(f"{key} clashes with {part}")
            node = child
        node[parts[-1]] = value
    return plain
