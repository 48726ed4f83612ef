"""Bench inputs, built once in the parent (main venv) and handed to both sides as plain files.

The rows are the shipped default dataset, cycled to exactly the number of rows the timed run
consumes, so each side sees every row once (one epoch: neither starts a second, neither reuses a
cached batch). Both sides read the same canonical JSONL, so they train on the same token counts.
"""
from __future__ import annotations

import json
import statistics
from itertools import cycle, islice
from pathlib import Path


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cycled(records: list, n: int) -> list:
    if not records:
        raise ValueError("the default dataset is empty")
    return list(islice(cycle(records), n))


def demonstrations(out_dir: Path, n: int, tokenizer, max_length: int, source: str = "default:demonstrations") -> dict:
    """n demonstration rows -> {path, rows, tokens_per_sample (mean, after truncation)}."""
    from data_schemas.loaders import load_demonstrations
    from data_schemas.records import to_canonical
    from data_schemas.spec import DatasetSpec

    rows = [to_canonical(d) for d in _cycled(load_demonstrations(DatasetSpec(source=source)), n)]
    lengths = [min(max_length, len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]))
               for r in rows]
    return {"path": str(_write_jsonl(out_dir / "demonstrations.jsonl", rows)), "rows": n,
            "tokens_per_sample": statistics.fmean(lengths)}


def preference_pairs(out_dir: Path, n: int, tokenizer, max_length: int, source: str = "default:preferences") -> dict:
    """n preference *pairs* (rankings flattened to their K(K-1)/2 pairs first, so both trainers see
    the same two-sequence comparisons) -> {path, rows, tokens_per_sample (chosen + rejected)}."""
    from data_schemas.loaders import load_preferences
    from data_schemas.records import as_chat, to_canonical, to_pairs
    from data_schemas.spec import DatasetSpec

    pairs = _cycled(to_pairs(load_preferences(DatasetSpec(source=source))), n)
    rows = [to_canonical(p) for p in pairs]
    lengths = []
    for p in pairs:
        prompt = tokenizer.apply_chat_template(as_chat(p.prompt), tokenize=False, add_generation_prompt=True)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        lengths.append(sum(min(max_length, n_prompt + len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1)
                           for r in (p.chosen, p.rejected)))
    return {"path": str(_write_jsonl(out_dir / "preferences.jsonl", rows)), "rows": n,
            "tokens_per_sample": statistics.fmean(lengths)}


def prompts(out_dir: Path, n: int, tokenizer, source: str = "default:prompts") -> dict:
    """n prompt rows -> {path, rows, prompt_tokens (mean, rendered with the generation header), texts}."""
    from data_schemas.loaders import load_prompts
    from data_schemas.records import as_chat
    from data_schemas.spec import DatasetSpec

    recs = _cycled(load_prompts(DatasetSpec(source=source)), n)
    rows = [{"id": f"bench-{i}", "messages": as_chat(p.messages)} for i, p in enumerate(recs)]
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True) for r in rows]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return {"path": str(_write_jsonl(out_dir / "prompts.jsonl", rows)), "rows": n,
            "prompt_tokens": statistics.fmean(lengths), "texts": texts}
