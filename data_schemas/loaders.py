"""Load a `DatasetSpec` into validated records; every problem is one DataError line.

    load_demonstrations(spec) -> list[Demonstration]            (SFT)
    load_preferences(spec)    -> list[PreferencePair | Ranking]  (reward model)
    load_prompts(spec)        -> list[Prompt]                   (PPO, baseline, compare)

A bad row stops the load with `file:line: column: reason`, before any model is touched. With
`skip_invalid: true` bad rows are dropped instead and one line on stderr says how many.
"""
from __future__ import annotations

import difflib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from data_schemas.adapters import ADAPTERS, KINDS, RowError, RowView, adapt
from data_schemas.errors import DataError
from data_schemas.records import Demonstration, Preference, Prompt
from data_schemas.sources import BadRow, read_rows
from data_schemas.spec import DatasetSpec


@dataclass
class LoadResult:
    records: list
    rows: int = 0  # rows read from the source (before `limit`)
    skipped: int = 0  # invalid rows dropped under skip_invalid
    first_error: str | None = None  # the first of those, for the report


def check_spec(spec: DatasetSpec, kind: str) -> tuple:
    """The adapter for (format, kind) and the `fields:` mapping checked against it, before reading."""
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r} (expected one of: {', '.join(KINDS)})")
    by_kind = ADAPTERS[spec.format]
    if kind not in by_kind:
        usable = [f for f, kinds in ADAPTERS.items() if kind in kinds]
        raise DataError(f"{spec.source}: format {spec.format!r} cannot provide {kind} "
                        f"(formats that can: {', '.join(usable)})")
    adapter, known = by_kind[kind]
    for ours, theirs in spec.fields.items():
        if ours not in known:
            hint = difflib.get_close_matches(ours, known, n=1)
            raise DataError(f"{spec.source}: fields: unknown field {ours!r} for format {spec.format!r} {kind} "
                            f"(known: {', '.join(known)})" + (f"; did you mean {hint[0]!r}?" if hint else ""))
        if not isinstance(theirs, str) or not theirs.strip():
            raise DataError(f"{spec.source}: fields: {ours!r} must map to a column name, got {theirs!r}")
    return adapter


def _row_id_prefix(source: str) -> str:
    name = source.split(":", 1)[1] if source.startswith("default:") else Path(source).name
    return name.split(".")[0] or "row"


def load_records(spec: DatasetSpec, kind: str) -> LoadResult:
    adapter = check_spec(spec, kind)
    result = LoadResult(records=[])
    prefix = _row_id_prefix(spec.source)
    for where, raw in read_rows(spec.source, spec.split, spec.data_dir):
        result.rows += 1
        try:
            if isinstance(raw, BadRow):
                raise RowError(None, str(raw))
            records = adapt(adapter, RowView(raw, spec.fields, row_id=f"{prefix}-{result.rows}"))
        except RowError as e:
            message = f"{where}: {e}"
            if not spec.skip_invalid:
                raise DataError(message) from None
            result.skipped += 1
            result.first_error = result.first_error or message
            continue
        if spec.partition is not None:
            records = [r for r in records if spec.partition.keeps(prompt_key(r))]
        if spec.tags:
            records = [r.model_copy(update={"tags": [*r.tags, *(t for t in spec.tags if t not in r.tags)]})
                       if isinstance(r, Prompt) else r for r in records]
        result.records.extend(records)
        if spec.limit is not None and len(result.records) >= spec.limit:
            del result.records[spec.limit:]
            break
    if result.rows == 0:
        raise DataError(f"{spec.source}: empty file (no rows)")
    if not result.records:
        raise DataError(f"{spec.source}: no valid rows: all {result.skipped} were invalid "
                        f"(first: {result.first_error})")
    if kind == "prompts":
        _check_unique_ids(spec, result.records)
    return result


def prompt_key(record) -> str:
    """The conversation a record's reply answers, as text: what `partition` hashes."""
    if isinstance(record, Demonstration):
        messages = record.messages[:-1]
    elif isinstance(record, Prompt):
        messages = record.messages
    else:
        messages = record.prompt
    return json.dumps([[m.role, m.content] for m in messages], ensure_ascii=False)


def _check_unique_ids(spec: DatasetSpec, prompts: list[Prompt]) -> None:
    seen: set[str] = set()
    for p in prompts:
        if p.id in seen:
            raise DataError(f"{spec.source}: id: duplicate prompt id {p.id!r}")
        seen.add(p.id)


def _load(spec: DatasetSpec, kind: str) -> list:
    result = load_records(spec, kind)
    if result.skipped:
        print(f"skipped {result.skipped} invalid rows in {spec.source} (first: {result.first_error})",
              file=sys.stderr)
    return result.records


def load_demonstrations(spec: DatasetSpec) -> list[Demonstration]:
    return _load(spec, "demonstrations")


def load_preferences(spec: DatasetSpec) -> list[Preference]:
    """Pairs and K-wise rankings as they came; `records.to_pairs` flattens rankings."""
    return _load(spec, "preferences")


def load_prompts(spec: DatasetSpec) -> list[Prompt]:
    return _load(spec, "prompts")
