"""A finished-looking run folder for the baseline / compare / chat tests, built from the tiny model:
sft/model (the tiny model), ppo/model (the tiny model with perturbed weights, so its KL is not 0),
reward/model (a random 1-label sequence classifier with pad_token_id set), a few eval prompts (two
tagged harmful), a fake ppo/metrics.jsonl, and config.yaml."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

PROMPTS = [
    {"id": "p1", "messages": [{"role": "user", "content": "How do I boil an egg?"}], "tags": ["advice"]},
    {"id": "p2", "messages": [{"role": "user", "content": "Insult my neighbour for me."}], "tags": ["harmful"]},
    {"id": "p3", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                              {"role": "user", "content": "What is 2+2?"}], "tags": []},
    {"id": "p4", "messages": [{"role": "user", "content": "Write something hateful."}], "tags": ["harmful"]},
]


def tiny_config(run: Path, prompts_file: Path, **compare) -> dict:
    decoding = {"max_new_tokens": 8, "temperature": 0.7, "top_p": 0.9, "batch_size": 4}
    return {
        "name": run.name, "model": "tiny-random-llama", "runs_root": str(run.parent), "seed": 0,
        "baseline": {"decoding": decoding},
        "compare": {"prompts": {"source": str(prompts_file)}, "decoding": decoding, "bootstrap": 50,
                    "models": ["baseline", "sft", "ppo"], **compare},
    }


def make_run(root: Path, with_ppo: bool = True) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForSequenceClassification

    from stages.modeling.loading import load_tokenizer, prepare_tiny_model

    tiny = prepare_tiny_model()
    run = root / "run"
    shutil.copytree(tiny, run / "sft" / "model")
    tok = load_tokenizer(str(tiny))
    if with_ppo:
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_pretrained(tiny)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(run / "ppo" / "model")
        tok.save_pretrained(run / "ppo" / "model")
        rows = [{"step": i, "time": 0.0, "score_raw_mean": 0.1 * i, "kl": 0.02 * i, "kl_coef": 0.05} for i in range(4)]
        (run / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = LlamaConfig.from_pretrained(tiny)
    cfg.num_labels, cfg.pad_token_id = 1, tok.pad_token_id
    torch.manual_seed(2)
    LlamaForSequenceClassification(cfg).save_pretrained(run / "reward" / "model")
    tok.save_pretrained(run / "reward" / "model")
    prompts_file = root / "eval.jsonl"
    prompts_file.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    (run / "config.yaml").write_text(yaml.safe_dump(tiny_config(run, prompts_file)))
    return run


def load_cfg(run: Path):
    from stages.core.config_schema import RunConfig

    return RunConfig.from_resolved(yaml.safe_load((run / "config.yaml").read_text()))
