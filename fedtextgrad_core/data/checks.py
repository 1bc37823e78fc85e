"""Checks of a local data file's text before ``datasets`` reads it.

``datasets`` and pyarrow report a bad file as a chain of internal errors (a
``StopIteration`` for an empty file, an ``ArrowInvalid`` with no line number for one
broken JSON line, a ``UnicodeDecodeError`` for a Latin-1 file). These checks read
the file once with the standard library and name what is wrong in a user's terms:
the file, the line, the field. A file that passes is then loaded by ``datasets`` as
before, so the loading path stays the same for local and online data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedtextgrad_core.errors import DataError

__all__ = ["check_json_file", "check_jsonl_file"]

_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_UTF8_BOM = b"\xef\xbb\xbf"


# What each record field may hold: pyarrow builds one typed column per field, so a value of
# another type (or a column mixing text and numbers) would fail deep inside it.
Kinds = Mapping[str, tuple[type, ...]]


def _parse(text: str, where: str, expected: str, whole_file: bool) -> object:
    """JSON ``text`` parsed, or a DataError saying where it is broken."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = f"line {exc.lineno}, column {exc.colno}" if whole_file else f"column {exc.colno}"
        raise DataError(f"{where} is not valid JSON ({exc.msg} at {at}); expected {expected}") from exc
    except RecursionError as exc:
        raise DataError(f"{where} nests JSON too deeply to read; expected {expected}") from exc


def check_json_file(path: Path, field: str, kinds: Kinds, expected: str) -> None:
    """``path`` holds one JSON object whose ``field`` is a non-empty list of records with ``kinds``."""
    text = _read_text(path, expected, bom_ok=False)
    document = _parse(text, f"'{path}'", expected, whole_file=True)
    try:
        records = document[field]  # type: ignore[index]
    except (KeyError, TypeError, IndexError) as exc:
        what = f"has no '{field}' field" if isinstance(document, dict) else f"holds a JSON {_kind(document)}, not an object"
        raise DataError(f"'{path}' {what}; expected {expected}") from exc
    if not isinstance(records, list):
        raise DataError(f"'{path}': '{field}' is a JSON {_kind(records)}, not a list; expected {expected}")
    if not records:
        raise DataError(f"'{path}': '{field}' is an empty list; expected {expected}")
    first: dict[str, tuple[type, str]] = {}
    for index, record in enumerate(records):
        _check_record(record, kinds, f"'{path}': example {index}", expected, first)


def check_jsonl_file(path: Path, kinds: Kinds, expected: str) -> None:
    """``path`` holds one JSON object per line (blank lines allowed), each with fields of ``kinds``."""
    text = _read_text(path, expected, bom_ok=True)
    first: dict[str, tuple[type, str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        record = _parse(line, f"'{path}' line {number}", expected, whole_file=False)
        _check_record(record, kinds, f"'{path}' line {number}", expected, first)


def _read_text(path: Path, expected: str, bom_ok: bool) -> str:
    """The file's text, or a DataError saying why it is not usable text.

    ``bom_ok``: whether ``datasets`` reads this kind of file when it starts with a UTF-8
    byte-order mark (its JSON-lines reader skips one; its whole-JSON reader fails on it).
    """
    try:
        raw = path.read_bytes()
    except IsADirectoryError as exc:
        raise DataError(f"'{path}' is a folder, but a data file is expected; expected {expected}") from exc
    except OSError as exc:
        raise DataError(f"could not read '{path}': {exc.strerror or exc}") from exc
    if not raw.strip():
        raise DataError(f"'{path}' is an empty file; expected {expected}")
    if raw.startswith(_UTF16_BOMS):
        raise DataError(f"'{path}' is not UTF-8 text (it is UTF-16); save it as UTF-8")
    if raw.startswith(_UTF8_BOM) and not bom_ok:
        raise DataError(f"'{path}' starts with a UTF-8 byte-order mark (as some Windows editors write), "
                        "which the JSON reader does not accept; save it as UTF-8 without BOM")
    raw = raw.removeprefix(_UTF8_BOM)
    if b"\x00" in raw:
        line = raw.count(b"\n", 0, raw.index(b"\x00")) + 1
        raise DataError(f"'{path}' is not UTF-8 text: line {line} holds NUL bytes, as binary or UTF-16 files do")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        byte = raw[exc.start:exc.start + 1].hex()
        raise DataError(f"'{path}' is not UTF-8 text: byte 0x{byte} on line {line} "
                        "(is it Latin-1 or another encoding? save it as UTF-8)") from exc


def _check_record(record: Any, kinds: Kinds, where: str, expected: str, first: dict[str, tuple[type, str]]) -> None:
    """One record: an object with every field of ``kinds``, each of an allowed type and of the
    same type as in the first record (``first`` remembers it)."""
    if not isinstance(record, dict):
        raise DataError(f"{where} is a JSON {_kind(record)}, not an object; expected {expected}")
    missing = [name for name in kinds if name not in record]
    if missing:
        raise DataError(f"{where} has no {' or '.join(repr(m) for m in missing)} field; expected {expected}")
    for name, allowed in kinds.items():
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, allowed):
            accepted = " or ".join("text" if kind is str else "a whole number" for kind in allowed)
            raise DataError(f"{where}: '{name}' is a JSON {_kind(value)}, not {accepted}; expected {expected}")
        seen_type, seen_where = first.setdefault(name, (type(value), where))
        if seen_type is not type(value):
            raise DataError(f"{where}: '{name}' is a JSON {_kind(value)}, but it is "
                            f"{'text' if seen_type is str else 'a number'} at {seen_where}; "
                            f"every '{name}' must be of one type")


def _kind(value: Any) -> str:
    """JSON's name for the type of a parsed value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false value"
    return {dict: "object", list: "list", str: "string", int: "number", float: "number"}.get(type(value), "value")
