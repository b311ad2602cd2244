"""Strict, line-numbered JSON Lines reading and atomic writing.

Every input error names the file, the line and the field (``data.jsonl:7: parent_id: ...``), because
a user fixing a 90k-line file needs to know where to look. Output is written to a temporary file in
the destination folder and renamed over it only once complete, so a failed run never leaves a
half-written file and never touches an existing one.
"""
from __future__ import annotations

import gzip
import json
import re
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import DataError, where
from ..fileio import atomic_open

_GZIP_MAGIC = b"\x1f\x8b"


def open_binary(path):
    """Open `path` for reading bytes, transparently gunzipping (detected by content, not name)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    with open(p, "rb") as f:
        head = f.read(2)
    return gzip.open(p, "rb") if head == _GZIP_MAGIC else open(p, "rb")


def read_jsonl(path, allow_empty: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; raise DataError on the first bad one.

    Lines are decoded one by one so a non-UTF-8 byte is reported with its line. Blank lines are
    skipped (a trailing newline is not an error); a file with no record at all is, unless
    `allow_empty` (a run's metrics before its first logged step).
    """
    n = 0
    f = open_binary(path)
    try:
        lineno = 0
        while True:
            try:
                raw = f.readline()
            except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt gzip stream
                raise DataError(f"{where(path, lineno + 1)}: not a valid gzip stream ({e})") from None
            if not raw:
                break
            lineno += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where(path, lineno)}: not UTF-8 text (byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where(path, lineno)}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where(path, lineno)}: expected a JSON object, got {_json_type(obj)}")
            n += 1
            yield lineno, obj
    finally:
        f.close()
    if n == 0 and not allow_empty:
        raise DataError(f"{where(path)}: empty file (no JSON record)")


def read_records(path) -> Iterator[tuple[int, dict]]:
    """JSONL, or a .json file holding one array of objects (numbered by position, from 1)."""
    p = Path(path)
    if p.suffix.lower() != ".json":
        yield from read_jsonl(p)
        return
    with open_binary(p) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{where(p, line)}: not UTF-8 text") from None
    if not text.strip():
        raise DataError(f"{where(p)}: empty file (no JSON record)")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where(p, e.lineno)}: invalid JSON: {e.msg} (column {e.colno})") from None
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
        obj = next(iter(obj.values()))  # {"data": [...]}, as datasets' json loader accepts
    if not isinstance(obj, list):
        raise DataError(f"{where(p)}: a .json data file must hold an array of objects")
    if not obj:
        raise DataError(f"{where(p)}: empty file (no JSON record)")
    for i, row in enumerate(obj, 1):
        if not isinstance(row, dict):
            raise DataError(f"{where(p, i)}: record {i}: expected a JSON object, got {_json_type(row)}")
        yield i, row


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(v), type(v).__name__)


_TYPE_WORDS = {str: "a string", bool: "true or false", int: "a number", float: "a number", list: "an array",
               dict: "an object"}


def field(obj: dict, name: str, types, path, line, *, required: bool = True, nullable: bool = False,
          label: str | None = None, default=None):
    """obj[name] checked against `types` (a type or tuple); DataError naming file:line: field."""
    label = label or name
    if name not in obj:
        if required:
            raise DataError(f"{where(path, line, label)}: missing")
        return default
    v = obj[name]
    if v is None:
        if nullable or not required:
            return None if nullable else default
        raise DataError(f"{where(path, line, label)}: must not be null")
    types = types if isinstance(types, tuple) else (types,)
    ok = any(isinstance(v, t) and not (t in (int, float) and isinstance(v, bool)) for t in types)
    if not ok:
        words = dict.fromkeys(_TYPE_WORDS.get(t, t.__name__) for t in types)
        want = " or ".join(words) + (" or null" if nullable else "")
        raise DataError(f"{where(path, line, label)}: must be {want} (got {_json_type(v)} {_short(v)})")
    return v


def _short(v) -> str:
    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= 40 else s[:37] + "..."


def write_jsonl_atomic(path, rows: Iterable[dict]) -> int:
    """Write rows as JSON Lines to `path` via a temp file + rename; returns the row count.

    If anything fails (including an error raised while producing `rows`), the temp file is removed
    and an existing `path` is left exactly as it was.
    """
    n = 0
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def is_hub_id(source) -> bool:
    """`owner/name` that is not a local path and has no data-file extension."""
    s = str(source)
    return (not Path(s).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", s) is not None
            and not re.search(r"\.(jsonl?|gz)$", s))


def input_rows(source, split: str = "train") -> tuple[str, Iterator[tuple[int, dict]]]:
    """(label for error messages, (row number, row) pairs) from a local JSONL file or a hub id."""
    if is_hub_id(source):
        return f"{source}[{split}]", _hub_rows(str(source), split)
    return str(source), read_jsonl(source)


def _hub_rows(name: str, split: str) -> Iterator[tuple[int, dict]]:  # pragma: no cover - needs a network
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split=split)
    except Exception as e:  # offline, unknown or gated id, unknown split: one line for the user
        first = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"{name}: not a local file, and loading it as a hub dataset failed: "
                        f"{type(e).__name__}: {first}") from None
    for i, row in enumerate(ds, 1):
        yield i, dict(row)
