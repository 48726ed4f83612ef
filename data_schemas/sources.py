"""Read raw rows from a source, each with where it came from (`file:line` or `file:row N`).

JSONL, JSON and CSV are read here line by line so that an error can name the exact line (and
non-UTF-8 bytes are caught per line); Parquet goes through pyarrow and hub names through
`datasets`, where only a row index exists. `.gz` works for every file format.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_schemas.errors import DataError

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
DEFAULT_DIR = Path(__file__).resolve().parent / "default"
DEFAULT_NAMES = ("demonstrations", "preferences", "prompts", "eval_prompts")

Row = tuple[str, "dict[str, Any] | BadRow"]  # (location for error messages, the raw row)


def resolve_source(source: str) -> Path | str:
    """A local Path, or the string itself when it can only be a hub dataset name."""
    if source.startswith("default:"):
        name = source.split(":", 1)[1]
        if name not in DEFAULT_NAMES:
            raise DataError(f"{source}: unknown default dataset (choose from: "
                            + ", ".join(f"default:{n}" for n in DEFAULT_NAMES) + ")")
        return DEFAULT_DIR / f"{name}.jsonl"
    path = Path(source).expanduser()
    if path.exists() or _extension(path) or source.startswith((".", "/", "~")) or source.count("/") != 1:
        return path
    return source  # "owner/name": a hub dataset


def _extension(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def read_rows(source: str, split: str = "train", data_dir: str | None = None) -> Iterator[Row]:
    """Yield (location, row) for every row of `source`. Raises DataError for unreadable input.
    data_dir: a hub dataset's subfolder (e.g. harmless-base of Anthropic/hh-rlhf)."""
    where = resolve_source(source)
    if isinstance(where, str):
        yield from _hub_rows(where, split, data_dir)
        return
    if data_dir is not None:
        raise DataError(f"{source}: data_dir is for hub datasets; point source at the file itself")
    path = where
    name = source if source.startswith("default:") else str(path)
    if not path.exists():
        raise DataError(f"{name}: file not found")
    if path.is_dir():
        raise DataError(f"{name}: is a folder, expected a data file")
    ext = _extension(path)
    if ext not in EXTENSIONS:
        shown = "".join(path.suffixes) or "(none)"
        raise DataError(f"{name}: unsupported file extension {shown!r} "
                        f"(use .jsonl, .json, .csv or .parquet, optionally .gz)")
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}
    try:
        yield from readers[ext](path, name)
    except (gzip.BadGzipFile, EOFError, OSError) as e:
        raise DataError(f"{name}: cannot read file: {e}") from None


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


class BadRow(str):
    """A line that could not even be read as a row (bad bytes, bad JSON): its one-line reason.

    It is yielded in place of the row, so `skip_invalid` can skip it like any other invalid row."""


def _decoded_lines(path: Path) -> Iterator[tuple[int, str, BadRow | None]]:
    with _open_bytes(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8"), None
            except UnicodeDecodeError as e:
                bad = BadRow(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                yield lineno, raw.decode("utf-8", errors="replace"), bad


def _jsonl_rows(path: Path, name: str) -> Iterator[Row]:
    for lineno, line, bad in _decoded_lines(path):
        if bad is None and not line.strip():
            continue
        if bad is None:
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                bad = BadRow(f"invalid JSON: {e.msg} (column {e.colno})")
            else:
                if not isinstance(row, dict):
                    bad = BadRow(f"expected a JSON object, got {_json_type(row)}")
        yield f"{name}:{lineno}", bad if bad is not None else row


def _json_rows(path: Path, name: str) -> Iterator[Row]:
    """A top-level array of objects; each row is located by the line its object starts on.

    Unlike JSONL, a syntax error or bad byte leaves the rest unreadable, so those stop the load."""
    text_parts = []
    for lineno, line, bad in _decoded_lines(path):
        if bad is not None:
            raise DataError(f"{name}:{lineno}: {bad}")
        text_parts.append(line)
    text = "".join(text_parts)
    dec = json.JSONDecoder()

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def line_of(i: int) -> int:
        return text.count("\n", 0, i) + 1

    i = skip_ws(0)
    if i == len(text):
        return
    if text[i] != "[":
        raise DataError(f"{name}:{line_of(i)}: expected a JSON array of objects at the top level")
    i = skip_ws(i + 1)
    while i < len(text) and text[i] != "]":
        try:
            row, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        if isinstance(row, dict):
            yield f"{name}:{line_of(i)}", row
        else:
            yield f"{name}:{line_of(i)}", BadRow(f"expected a JSON object, got {_json_type(row)}")
        i = skip_ws(end)
        if i < len(text) and text[i] == ",":
            i = skip_ws(i + 1)
        elif i >= len(text) or text[i] != "]":
            raise DataError(f"{name}:{line_of(i)}: invalid JSON: expected ',' or ']' after an array item")
    if i >= len(text):
        raise DataError(f"{name}:{line_of(i)}: invalid JSON: the array is not closed")


def _csv_rows(path: Path, name: str) -> Iterator[Row]:
    bad_lines: dict[int, BadRow] = {}

    def lines() -> Iterator[str]:
        for lineno, line, bad in _decoded_lines(path):
            if bad is not None:
                bad_lines[lineno] = bad
            yield line

    reader = csv.reader(lines())
    try:
        header = next(reader, None)
        if header is None:
            return
        if bad_lines:
            raise DataError(f"{name}:1: header: {bad_lines[1]}")
        header = [h.strip().lstrip("\ufeff") for h in header]
        start = reader.line_num + 1
        for cells in reader:
            bad = next((bad_lines[n] for n in range(start, reader.line_num + 1) if n in bad_lines), None)
            if bad is not None:
                yield f"{name}:{start}", bad
            elif cells and any(c.strip() for c in cells):
                if len(cells) != len(header):
                    reason = f"expected {len(header)} columns as in the header, got {len(cells)}"
                    yield f"{name}:{start}", BadRow(reason)
                else:
                    yield f"{name}:{start}", dict(zip(header, cells))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{name}:{reader.line_num}: malformed CSV: {e}") from None


def _parquet_rows(path: Path, name: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".gz":
            with gzip.open(path, "rb") as f:
                table = pq.read_table(io.BytesIO(f.read()))
        else:
            table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid etc. for corrupt files
        raise DataError(f"{name}: cannot read Parquet: {str(e).splitlines()[0]}") from None
    for i, row in enumerate(table.to_pylist(), 1):
        yield f"{name}:row {i}", row


def _hub_rows(name: str, split: str, data_dir: str | None = None) -> Iterator[Row]:
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split, **({"data_dir": data_dir} if data_dir else {}))
    except Exception as e:  # offline, unknown dataset, missing split: all one line for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{name}: not a local file, and loading it from the Hugging Face hub failed "
                        f"({first}); if you are offline, download it and point `source:` at the file") from None
    for i, row in enumerate(ds, 1):
        yield f"{name}[{split}]:row {i}", dict(row)


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)
