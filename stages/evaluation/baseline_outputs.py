"""The baseline stage's outputs as other stages see them: the prompt copy it ran with, its
generations, and the settings that made them (compare reuses the generations when its own settings
match, instead of generating again)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from data_schemas.records import as_chat
from data_schemas.spec import DatasetSpec
from stages.core.config_schema import Decoding, RunConfig
from stages.core.errors import StageError
from stages.core.run_folder import stage_dir
from stages.evaluation.dialogue_prompt import load_prompt_text, prompt_sha256

BASELINE = "baseline"  # the stage, and the model reference compare.models uses for it
PROMPT_COPY = "prompt.txt"  # the prompt the baseline ran with, inside run_dir/baseline/
GENERATIONS = "generations.jsonl"
SETTINGS = "generation_settings.json"


def baseline_model(cfg: RunConfig) -> str:
    return cfg.baseline.model or cfg.model


def baseline_prompt(cfg: RunConfig, run_dir: str | os.PathLike | None) -> str:
    """The run's baseline prompt: the baseline stage's saved copy if there is one, else the config's file."""
    if run_dir is not None:
        saved = stage_dir(run_dir, BASELINE) / PROMPT_COPY
        if saved.exists():
            return saved.read_text(encoding="utf-8")
    return load_prompt_text(cfg.baseline.prompt_file)


def load_eval_prompts(spec: DatasetSpec, samples_per_prompt: int = 1) -> list:
    """The prompts the baseline answers and compare judges (compare.prompts), each repeated
    samples_per_prompt times in a row as `<id>/<j>` (one response per row), so every model answers
    each prompt as often and the rows of one prompt sit together (see `metrics.resample_indices`)."""
    from data_schemas.loaders import load_prompts

    prompts = load_prompts(spec)
    if not prompts:
        raise StageError(f"compare.prompts ({spec.source}) has no prompts")
    if samples_per_prompt == 1:
        return prompts
    return [p.model_copy(update={"id": f"{p.id}/{j}"}) for p in prompts for j in range(samples_per_prompt)]


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


def generation_rows(prompts: list, samples: list) -> list[dict]:
    return [{"id": p.id, "tags": list(p.tags), "messages": as_chat(p.messages), "response": s.text,
             "num_tokens": s.num_tokens} for p, s in zip(prompts, samples)]


def reusable_generations(run_dir: Path, settings: dict) -> list[dict] | None:
    """The baseline stage's generations, if they were made with exactly these settings."""
    folder = stage_dir(run_dir, BASELINE)
    try:
        saved = json.loads((folder / SETTINGS).read_text())
        rows = [json.loads(line) for line in (folder / GENERATIONS).read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    return rows if saved == settings else None
