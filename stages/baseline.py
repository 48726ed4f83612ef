"""Baseline stage: the untuned model steered only by a dialogue prompt answers the eval prompts.

Reads : config `model:` (or baseline.model), baseline.prompt_file, compare.prompts
Writes: run_dir/baseline/prompt.txt            the resolved prompt text (so 'baseline' = {model, prompt})
        run_dir/baseline/generations.jsonl     one line per eval prompt: id, tags, messages, response
        run_dir/baseline/generation_settings.json  what produced them; `compare` reuses the file when
                                                its own settings match, instead of generating again
        run_dir/baseline/summary.json
"""
from __future__ import annotations

import time
from pathlib import Path

from data_schemas.files import atomic_write_json, atomic_write_jsonl, atomic_write_text
from data_schemas.records import as_chat
from stages.common import StageError, is_main_process, stage_dir, stage_main, write_stage_config, write_summary
from stages.config import Decoding, RunConfig
from stages.runtime import resolved, runtime_info
from stages.responders import (BASELINE, PROMPT_COPY, Sample, baseline_model, load_prompt_text,
                               prompt_sha256, responder_for)

GENERATIONS = "generations.jsonl"
SETTINGS = "generation_settings.json"


def load_eval_prompts(cfg: RunConfig) -> list:
    from data_schemas.loaders import load_prompts

    prompts = load_prompts(cfg.compare.prompts)
    if not prompts:
        raise StageError(f"compare.prompts ({cfg.compare.prompts.source}) has no prompts")
    return prompts


def generation_settings(cfg: RunConfig, prompt_text: str, prompts: list, decoding: Decoding) -> dict:
    """Everything that determines the baseline's samples; equal settings mean reusable samples."""
    return {
        "model": baseline_model(cfg),
        "prompt_sha256": prompt_sha256(prompt_text),
        "user_prefix": cfg.baseline.user_prefix,
        "assistant_prefix": cfg.baseline.assistant_prefix,
        "decoding": decoding.model_dump(),
        "seed": cfg.seed,
        "precision": cfg.precision,
        "prompts_sha256": prompt_sha256(repr([(p.id, [(m.role, m.content) for m in p.messages]) for p in prompts])),
    }


def generation_rows(prompts: list, samples: list[Sample]) -> list[dict]:
    return [{"id": p.id, "tags": list(p.tags), "messages": as_chat(p.messages), "response": s.text,
             "num_tokens": s.num_tokens} for p, s in zip(prompts, samples)]


def reusable_generations(run_dir: Path, settings: dict) -> list[dict] | None:
    """The baseline stage's generations, if they were made with exactly these settings."""
    import json

    folder = stage_dir(run_dir, BASELINE)
    try:
        saved = json.loads((folder / SETTINGS).read_text())
        rows = [json.loads(line) for line in (folder / GENERATIONS).read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    return rows if saved == settings else None


def run(cfg: RunConfig, run_dir: Path) -> dict:
    cfg = resolved(cfg)  # precision "auto" made concrete for this machine
    import torch

    if not is_main_process():  # generation is cheap and runs on one process
        return {}
    out = stage_dir(run_dir, BASELINE)
    out.mkdir(parents=True, exist_ok=True)
    write_stage_config(run_dir, BASELINE, cfg)
    prompts = load_eval_prompts(cfg)
    prompt_text = load_prompt_text(cfg.baseline.prompt_file)
    atomic_write_text(out / PROMPT_COPY, prompt_text)

    decoding = cfg.baseline.decoding
    responder = responder_for(BASELINE, cfg, run_dir, decoding)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    samples = responder.sample([as_chat(p.messages) for p in prompts])
    seconds = time.perf_counter() - start
    preamble_tokens = responder.count_tokens(prompt_text)
    responder.close()

    atomic_write_jsonl(out / GENERATIONS, generation_rows(prompts, samples))
    atomic_write_json(out / SETTINGS, generation_settings(cfg, prompt_text, prompts, decoding))
    lengths = [s.num_tokens for s in samples]
    summary = {
        "num_prompts": len(samples),
        "mean_response_tokens": round(sum(lengths) / len(lengths), 2),
        "empty_responses": sum(1 for s in samples if not s.text),
        "prompt_tokens": preamble_tokens,
        "generation_seconds": round(seconds, 2),
        **runtime_info(cfg.precision),
    }
    write_summary(run_dir, BASELINE, summary)
    return summary


if __name__ == "__main__":
    stage_main(BASELINE, run)
