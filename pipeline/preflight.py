"""Checks before anything is launched: data validates, models and tokenizers load, memory fits."""
from __future__ import annotations

import os
from dataclasses import dataclass

from stages.runtime import resolve_precision

GiB = 1024**3


@dataclass
class MemoryEstimate:
    stage: str
    params: int             # trainable + frozen parameters held by the stage, summed over its models
    trainable: int
    bytes_per_device: float
    detail: str


def _param_count(model_ref: str, trust_remote_code: bool) -> tuple[int, object]:
    """Parameters of a model from its config alone (meta device: nothing is materialised)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from stages.models import resolve_model

    cfg = AutoConfig.from_pretrained(resolve_model(model_ref), trust_remote_code=trust_remote_code)
    with init_empty_weights(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters()), cfg


def _lora_trainable(cfg_model, lora) -> int:
    h = getattr(cfg_model, "hidden_size", 0)
    layers = getattr(cfg_model, "num_hidden_layers", 0)
    return 7 * layers * 2 * lora.r * h  # ~7 adapted linears per block, each r x (in + out) ~ 2 r h


def estimate_memory(cfg, launch) -> list[MemoryEstimate]:
    """Rough per-device bytes for params + grads + Adam states + activations, per training stage."""
    n, mcfg = _param_count(cfg.model, cfg.trust_remote_code)
    h = getattr(mcfg, "hidden_size", 1024)
    layers = getattr(mcfg, "num_hidden_layers", 24)
    vocab = getattr(mcfg, "vocab_size", 32000)
    pbytes = 4 if resolve_precision(cfg.precision) == "fp32" else 2
    shard = launch.num_processes * launch.num_machines
    zero = 1
    if launch.accelerate_config and any(k in os.path.basename(launch.accelerate_config) for k in ("zero3", "fsdp")):
        zero = shard  # params, grads and optimizer states are sharded
    out = []

    def train_bytes(trainable: int, frozen: int, batch: int, seq: int) -> float:
        states = trainable * (pbytes + 4 + 8)  # weights + fp32 grads + Adam m, v
        acts = batch * seq * (layers * h * 34 * pbytes / 2 + vocab * 4)  # Korthikanti-style + fp32 logits
        return (states + frozen * pbytes) / zero + acts

    for name, sec, models in (("sft", cfg.sft, 1), ("reward", cfg.reward, 1)):
        tr = _lora_trainable(mcfg, sec.lora) if sec.lora.enabled else n
        frozen = n if sec.lora.enabled else 0
        b = train_bytes(tr, frozen, sec.batch_size, sec.max_length)
        out.append(MemoryEstimate(name, n, tr, b, f"batch {sec.batch_size} x {sec.max_length} tokens"))
    p = cfg.ppo
    seq = min(p.max_prompt_length, 128) + p.max_new_tokens
    pol_tr = _lora_trainable(mcfg, p.lora) if p.lora.enabled else n
    val_tr = _lora_trainable(mcfg, p.value_lora) if p.value_lora.enabled else n
    # policy (+ reference unless LoRA shares the base), value, reward model
    frozen = n + (0 if p.lora.enabled else n) + (n if p.value_lora.enabled else 0)
    b = train_bytes(pol_tr + val_tr, frozen, p.mini_batch_size, seq)
    out.append(MemoryEstimate("ppo", 4 * n, pol_tr + val_tr, b,
                              f"policy+ref+value+RM, minibatch {p.mini_batch_size} x {seq} tokens"))
    return out


def available_bytes() -> tuple[float, str]:
    try:
        import torch

        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info()
            return float(free), "GPU"
    except Exception:
        pass
    import psutil

    return float(psutil.virtual_memory().available), "RAM"


def validate_data(cfg, stages: list[str]) -> list[str]:
    """Load every dataset the selected stages read; DataError propagates as a one-line error."""
    from data_schemas.loaders import load_demonstrations, load_preferences, load_prompts

    lines = []
    if "sft" in stages or ("ppo" in stages and cfg.ppo.ptx_coef > 0):
        lines.append(f"sft.data: {len(load_demonstrations(cfg.sft.data))} demonstrations")
    if "reward" in stages:
        lines.append(f"reward.data: {len(load_preferences(cfg.reward.data))} preference records")
    if "ppo" in stages:
        lines.append(f"ppo.prompts: {len(load_prompts(cfg.ppo.prompts))} prompts")
    if "baseline" in stages or "compare" in stages:
        lines.append(f"compare.prompts: {len(load_prompts(cfg.compare.prompts))} prompts")
    return lines


def check_models(cfg) -> str:
    from stages.models import load_tokenizer

    tok = load_tokenizer(cfg.model, cfg.trust_remote_code)
    return f"model {cfg.model}: tokenizer ok ({len(tok)} tokens, pad={tok.pad_token!r}, eos={tok.eos_token!r})"
