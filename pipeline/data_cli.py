"""`rlhf data validate|stats|convert|preview`: check and inspect a dataset before training on it.

FILE is a local file or `default:<name>`; `--format`, `--field our=theirs` and `--skip-invalid`
mean the same as `format:`, `fields:` and `skip_invalid:` in a config's `data:` block.
Errors are DataError lines (exit code 2 via pipeline.cli), never tracebacks.
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import get_args

from data_schemas.adapters import KINDS
from data_schemas.errors import DataError
from data_schemas.files import atomic_write_jsonl
from data_schemas.loaders import LoadResult, load_records
from data_schemas.records import Demonstration, PreferencePair, Prompt, Ranking, to_canonical
from data_schemas.sources import BadRow, read_rows
from data_schemas.spec import DatasetSpec, Format

DEFAULT_KIND = {"demonstrations": "demonstrations", "preferences": "preferences", "prompts": "prompts",
                "eval_prompts": "prompts"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="validate, inspect and convert datasets")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    helps = {"validate": "check every row; exit 2 with `file:line: field: reason` on the first bad one",
             "stats": "counts, token lengths (default tokenizer) and duplicates",
             "convert": "write the records as our canonical JSONL (atomically)",
             "preview": "pretty-print the first records"}
    for name, h in helps.items():
        sp = dsub.add_parser(name, help=h)
        sp.add_argument("file", help="a .jsonl/.json/.csv/.parquet file (optionally .gz), a hub name, "
                        "or default:<name>")
        if name == "convert":
            sp.add_argument("out", help="output .jsonl path")
        sp.add_argument("--format", default="canonical", choices=get_args(Format),
                        help="source format (default: canonical)")
        sp.add_argument("--field", action="append", default=[], metavar="OURS=THEIRS",
                        help="map one of our field names to a source column; repeatable")
        sp.add_argument("--kind", choices=KINDS, help="what the rows are; guessed from the format or file when omitted")
        sp.add_argument("--skip-invalid", action="store_true", help="drop invalid rows and report how many")
        sp.add_argument("--split", default="train", help="split, for hub datasets")
        sp.add_argument("--limit", type=int, help="read at most this many records")
        if name == "preview":
            sp.add_argument("-n", type=int, default=3, help="how many records (default 3)")
        sp.set_defaults(handler=HANDLERS[name])


def _spec(args) -> DatasetSpec:
    fields = {}
    for item in args.field:
        ours, sep, theirs = item.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise DataError(f"--field {item!r}: expected OURS=THEIRS, e.g. --field prompt=question")
        fields[ours.strip()] = theirs.strip()
    if args.limit is not None and args.limit < 1:
        raise DataError(f"--limit {args.limit}: must be at least 1")
    return DatasetSpec(source=args.file, format=args.format, fields=fields, split=args.split,
                       skip_invalid=args.skip_invalid, limit=args.limit)


FORMAT_KIND = {"hh": "preferences", "trl": "preferences", "ab_label": "preferences", "ranked": "preferences",
               "alpaca": "demonstrations", "dolly": "demonstrations"}


def guess_kind(spec: DatasetSpec) -> str:
    """default:<name> and the format say it; canonical rows are recognised by their first row's keys."""
    if spec.source.startswith("default:"):
        return DEFAULT_KIND.get(spec.source.split(":", 1)[1], "prompts")
    if spec.format in FORMAT_KIND:
        return FORMAT_KIND[spec.format]
    for _, row in read_rows(spec.source, spec.split, spec.data_dir):
        if isinstance(row, BadRow):
            return "preferences"  # the load that follows reports the bad row
        if spec.fields.get("responses", "responses") in row or spec.fields.get("chosen", "chosen") in row:
            return "preferences"
        msgs = row.get(spec.fields.get("messages", "messages"))
        if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            return "demonstrations"
        return "prompts"
    return "preferences"  # no rows: the load that follows reports the empty file


def _load(args) -> tuple[DatasetSpec, str, LoadResult]:
    spec = _spec(args)
    kind = args.kind or guess_kind(spec)
    result = load_records(spec, kind)
    if result.skipped:
        print(f"skipped {result.skipped} invalid rows in {spec.source} (first: {result.first_error})", file=sys.stderr)
    return spec, kind, result


def _describe(records: list) -> str:
    counts = Counter(type(r).__name__ for r in records)
    names = {"Demonstration": "demonstrations", "PreferencePair": "preference pairs", "Ranking": "rankings",
             "Prompt": "prompts"}
    return ", ".join(f"{counts[k]} {name}" for k, name in names.items() if counts[k])


def cmd_validate(args) -> int:
    spec, kind, result = _load(args)
    print(f"{spec.source}: ok: {_describe(result.records)} from {result.rows} rows"
          + (f" ({result.skipped} invalid rows skipped)" if result.skipped else ""))
    return 0


def _length_counter():
    """Token counts with the default model's tokenizer; whitespace words if it is not provisioned."""
    try:
        from stages.modeling.loading import DEFAULT_MODEL, load_tokenizer

        tok = load_tokenizer(DEFAULT_MODEL)
        return "tokens", lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
    except Exception as e:  # not provisioned / offline: stats are still useful in words
        print(f"note: default tokenizer unavailable ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
              "counting whitespace words", file=sys.stderr)
        return "words", lambda text: len(text.split())


def _prompt_text(messages) -> str:
    return "\n".join(f"{m.role}: {m.content}" for m in messages)


def _summary(values: list[int]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return f"mean {statistics.mean(values):.1f}, median {statistics.median(values):g}, p95 {p95}, max {ordered[-1]}"


def cmd_stats(args) -> int:
    spec, kind, result = _load(args)
    records = result.records
    unit, count = _length_counter()
    prompts, replies, ks, tags = [], [], Counter(), Counter()
    for r in records:
        if isinstance(r, Demonstration):
            prompts.append(_prompt_text(r.prompt))
            replies.append(r.response)
        elif isinstance(r, PreferencePair):
            prompts.append(_prompt_text(r.prompt))
            replies += [r.chosen, r.rejected]
            ks[2] += 1
        elif isinstance(r, Ranking):
            prompts.append(_prompt_text(r.prompt))
            replies += r.responses
            ks[len(r.responses)] += 1
        elif isinstance(r, Prompt):
            prompts.append(_prompt_text(r.messages))
            tags.update(r.tags or ["(untagged)"])
    rows = [json.dumps(to_canonical(r), sort_keys=True) for r in records]
    print(f"source: {spec.source} (format {spec.format}, {kind})")
    print(f"records: {_describe(records)}; rows read {result.rows}, invalid skipped {result.skipped}")
    if ks:
        print("comparisons per prompt: " + ", ".join(f"K={k}: {n}" for k, n in sorted(ks.items()))
              + f"; pairwise comparisons in all: {sum(n * k * (k - 1) // 2 for k, n in ks.items())}")
    if tags:
        print("tags: " + ", ".join(f"{t} {n}" for t, n in tags.most_common()))
    print(f"prompt length ({unit}): {_summary([count(t) for t in prompts])}")
    if replies:
        print(f"reply length ({unit}): {_summary([count(t) for t in replies])}")
    print(f"duplicates: {len(rows) - len(set(rows))} identical records, "
          f"{len(prompts) - len(set(prompts))} repeated prompts ({len(set(prompts))} distinct)")
    return 0


def cmd_convert(args) -> int:
    spec, kind, result = _load(args)
    out = Path(args.out)
    if not out.name.endswith(".jsonl"):
        raise DataError(f"{out}: the output must be a .jsonl file")
    if out.resolve() == Path(spec.source).expanduser().resolve():
        raise DataError(f"{out}: refusing to overwrite the input file")
    atomic_write_jsonl(out, (to_canonical(r) for r in result.records))
    print(f"wrote {len(result.records)} records ({kind}, canonical) to {out}")
    return 0


PREVIEW_CHARS = 2000  # per string field: a preview of a 10 MB field should not print 10 MB


def _shorten(value, limit: int = PREVIEW_CHARS):
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + f"... [{len(value) - limit:,} more characters]"
    if isinstance(value, list):
        return [_shorten(v, limit) for v in value]
    if isinstance(value, dict):
        return {k: _shorten(v, limit) for k, v in value.items()}
    return value


def cmd_preview(args) -> int:
    if args.n < 1:
        raise DataError(f"-n {args.n}: must be at least 1")
    args.limit = min(args.limit or args.n, args.n)
    spec, kind, result = _load(args)
    for i, r in enumerate(result.records[: args.n], 1):
        print(f"--- {kind} record {i} ({type(r).__name__})")
        print(json.dumps(_shorten(to_canonical(r)), indent=2, ensure_ascii=False))
    return 0


HANDLERS = {"validate": cmd_validate, "stats": cmd_stats, "convert": cmd_convert, "preview": cmd_preview}
