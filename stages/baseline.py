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
from stages.core.config_schema import RunConfig, stage_inputs
from stages.core.entry import stage_main
from stages.core.run_folder import is_main_process, stage_dir, write_stage_config, write_summary
from stages.core.runtime import resolved, runtime_info
from stages.evaluation.baseline_outputs import (BASELINE, GENERATIONS, PROMPT_COPY, SETTINGS, generation_rows,
                                                generation_settings, load_eval_prompts)
from stages.evaluation.dialogue_prompt import load_prompt_text
from stages.evaluation.responders import responder_for


def run(cfg: RunConfig, run_dir: Path) -> dict:
    cfg = resolved(cfg)  # precision "auto" made concrete for this machine
    import torch

    if not is_main_process():  # generation is cheap and runs on one process
        return {}
    out = stage_dir(run_dir, BASELINE)
    out.mkdir(parents=True, exist_ok=True)
    write_stage_config(run_dir, BASELINE, cfg)
    inputs = stage_inputs(cfg, BASELINE).settings
    prompts = load_eval_prompts(inputs["compare.prompts"], inputs["compare.samples_per_prompt"])
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
        "num_prompts": len(samples) // inputs["compare.samples_per_prompt"],
        "num_responses": len(samples),
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
