"""The four roles of PPO (policy, frozen reference, value, reward) and their forward passes, plus
the stage's resume checkpoints and the model export. The training loop is in stages/ppo.py.

Memory: every forward pass here computes vocabulary logits only for the response positions
(`logits_to_keep`) and applies the value/score head only where it is needed; with
`ppo.lora.enabled` the reference is the policy's own base weights with the adapter disabled, and
with `ppo.value_lora.enabled` (and value_init = the RM) the reward model is the value model's base
with its adapter disabled, so no base is held twice.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from data_schemas.files import atomic_replace_dir, atomic_write_json, staging_dir
from stages.common import StageError, resolve_input_model
from stages.common import list_checkpoints as common_list_checkpoints
from stages.config import RunConfig
from stages.models import load_causal_lm, load_reward_model
from stages.runtime import autocast_layout
from stages.trainloop import apply_lora

CKPT_PREFIX = "iter-"
KEEP_CHECKPOINTS = 2
RESUMABLE_CHANGES = ("iterations", "save_every")  # may change between a run and its resume


def _is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def _base(model):
    return model.get_base_model() if _is_peft(model) else model


class ValueModel(torch.nn.Module):
    """V(s_t) for every response position: a sequence classifier's backbone, with its one-output
    score head applied to each hidden state (InstructGPT initialises it from the RM)."""

    def __init__(self, seq_cls):
        super().__init__()
        base = _base(seq_cls)
        self.backbone = getattr(base, base.base_model_prefix)   # e.g. LlamaForSequenceClassification.model
        self.head = base.score                                   # a ModulesToSaveWrapper under LoRA
        object.__setattr__(self, "seq_cls", seq_cls)            # kept for disable_adapter, not a submodule

    def hidden(self, input_ids, attention_mask, position_ids):
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state

    def forward(self, input_ids, attention_mask, position_ids, response_len: int):
        """-> (B, R) values of the states before each response token (the positions predicting it)."""
        h = self.hidden(input_ids, attention_mask, position_ids)[:, -response_len - 1:-1]
        return self.head(h).squeeze(-1).float()


def last_token_scores(model: ValueModel | torch.nn.Module, input_ids, attention_mask, position_ids):
    """-> (B,) the score head on the last attended token (a reward model's scalar reward)."""
    vm = model if isinstance(model, ValueModel) else ValueModel(model)
    h = vm.hidden(input_ids, attention_mask, position_ids)
    last = attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(1)
    return vm.head(h[torch.arange(h.shape[0], device=h.device), last]).squeeze(-1).float()


def policy_logits(model, input_ids, attention_mask, position_ids, response_len: int, temperature: float):
    """-> (B, R, V) the logits that predicted each response token, divided by the sampling temperature
    so log-probs are those of the distribution the tokens were drawn from (top-p aside)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                logits_to_keep=response_len + 1)
    return out.logits[:, :-1].float() / temperature


@dataclass
class PPOModels:
    """policy: trainable causal LM (a PeftModel with ppo.lora).
    ref:    frozen causal LM, or None when the reference is the policy with its adapter disabled.
    value:  ValueModel (trainable).
    reward: frozen sequence classifier, None with a reward_fn or when it is the value's base (shared).
    reward_shared: the RM is `value` with its adapter disabled."""

    policy: torch.nn.Module
    ref: torch.nn.Module | None
    value: ValueModel
    reward: torch.nn.Module | None
    reward_shared: bool
    policy_path: str
    reward_path: str | None
    value_path: str


def _frozen(model):
    model.requires_grad_(False)
    return model.eval()


def load_models(cfg: RunConfig, run_dir: Path, pad_token_id: int, log=print) -> PPOModels:
    p, trc = cfg.ppo, cfg.trust_remote_code
    policy_path = resolve_input_model(run_dir, p.policy, "ppo.policy")
    reward_path = None if p.reward_fn else resolve_input_model(run_dir, p.reward_model, "ppo.reward_model")

    policy = load_causal_lm(policy_path, "fp32", trc)
    ref = None
    if p.lora.enabled:
        policy = apply_lora(policy, p.lora, "CAUSAL_LM")
    else:
        # Never trained: matmul weights in the autocast dtype, so the reference computes exactly what
        # the (fp32-master) policy computes under autocast, and KL is 0 before the first update.
        ref = _frozen(autocast_layout(load_causal_lm(policy_path, "fp32", trc), cfg.precision))
    policy.eval()  # PPO wants no dropout: ratios must be exactly 1 before the first update

    zero_head = False
    if p.value_init == "reward" and reward_path is not None:
        value_path = reward_path
    elif p.value_init in ("reward", "policy"):
        if p.value_init == "reward":
            log("ppo: value_init 'reward' with a reward_fn (no reward model): the value starts from the policy")
        value_path, zero_head = policy_path, True
    else:
        value_path = resolve_input_model(run_dir, p.value_init, "ppo.value_init")
    value_seq = load_reward_model(value_path, "fp32", trc, pad_token_id=pad_token_id)
    if zero_head:  # a fresh head on the policy backbone: start from V = 0 rather than noise
        torch.nn.init.zeros_(_base(value_seq).score.weight)
    if p.value_lora.enabled:
        value_seq = apply_lora(value_seq, p.value_lora, "SEQ_CLS")
    value_seq.eval()
    value = ValueModel(value_seq)

    reward, shared = None, False
    if reward_path is not None:
        if p.value_lora.enabled and value_path == reward_path:
            shared = True
        else:
            reward = _frozen(autocast_layout(load_reward_model(reward_path, "fp32", trc, pad_token_id=pad_token_id),
                                             cfg.precision))
    return PPOModels(policy, ref, value, reward, shared, policy_path, reward_path, value_path)


def reference_context(models: PPOModels, policy):
    """Where reference log-probs come from: the frozen copy, or the policy with its adapter off."""
    if models.ref is not None:
        return models.ref, nullcontext()
    return policy, policy.disable_adapter()


def reward_scores(models: PPOModels, value_unwrapped: ValueModel, input_ids, attention_mask, position_ids):
    """(B,) raw reward-model scores of the full sequences."""
    if models.reward_shared:
        with value_unwrapped.seq_cls.disable_adapter():
            return last_token_scores(value_unwrapped, input_ids, attention_mask, position_ids)
    return last_token_scores(models.reward, input_ids, attention_mask, position_ids)


def load_reward_stats(reward_path: str | None) -> dict | None:
    """The RM's saved score statistics {"mean", "std"}, or None if absent/unreadable."""
    if reward_path is None:
        return None
    path = Path(reward_path) / "reward_stats.json"
    try:
        stats = json.loads(path.read_text())
        return {"mean": float(stats["mean"]), "std": max(float(stats["std"]), 1e-6)}
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---- trainable state, checkpoints ----

def trainable_params(module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


class TrainableState:
    """state_dict/load_state_dict over the trainable parameters only, so the spike guard's
    snapshots (and checkpoints) do not copy frozen base weights."""

    def __init__(self, module):
        self.module = module

    def state_dict(self) -> dict:
        return {n: p.detach() for n, p in trainable_params(self.module).items()}

    def load_state_dict(self, state: dict) -> None:
        own = trainable_params(self.module)
        missing = sorted(set(own) - set(state))
        unknown = sorted(set(state) - set(own))
        if missing or unknown:
            raise StageError(f"checkpoint does not match the model ({(missing or unknown)[0]}); "
                             "delete the ppo checkpoints folder to start over")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(state[n].to(p.device, p.dtype))


def config_fingerprint(cfg: RunConfig) -> str:
    section = cfg.ppo.model_dump(mode="json")
    for k in RESUMABLE_CHANGES:
        section.pop(k, None)
    key = {"model": cfg.model, "seed": cfg.seed, "precision": cfg.precision, "ppo": section}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    return common_list_checkpoints(root, CKPT_PREFIX, "state.json")


def rng_state() -> dict:
    import random

    state = {"cpu": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import random

    torch.set_rng_state(state["cpu"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(root: Path, iteration: int, *, policy, value, optimizers: dict, ema: dict | None,
                    state: dict, rng_per_rank: list) -> Path:
    """iter-N/: policy.safetensors + value.safetensors (trainable params), ema.safetensors,
    optimizer.pt, rng.pt (every rank's generators, generation included), state.json. Written to a
    staging folder and moved into place; only the last KEEP_CHECKPOINTS are kept."""
    from safetensors.torch import save_file

    final = root / f"{CKPT_PREFIX}{iteration}"
    tmp = staging_dir(final)
    for name, module in (("policy", policy), ("value", value)):
        params = {n: t.detach().to("cpu").contiguous() for n, t in trainable_params(module).items()}
        save_file(params, str(tmp / f"{name}.safetensors"))
    if ema is not None:
        save_file({n: t.to("cpu").contiguous() for n, t in ema.items()}, str(tmp / "ema.safetensors"))
    torch.save({k: o.state_dict() for k, o in optimizers.items()}, tmp / "optimizer.pt")
    torch.save({"ranks": rng_per_rank}, tmp / "rng.pt")
    atomic_write_json(tmp / "state.json", {**state, "iteration": iteration})
    atomic_replace_dir(tmp, final)
    for _, old in list_checkpoints(root)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainable(path: Path, *, policy, value, optimizers: dict) -> dict:
    """Restore the trainable weights and optimizer states of a checkpoint (what a spike-guard rollback
    needs); returns state.json."""
    from safetensors.torch import load_file

    for name, module in (("policy", policy), ("value", value)):
        TrainableState(module).load_state_dict(load_file(str(path / f"{name}.safetensors")))
    opt_states = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    for k, o in optimizers.items():
        o.load_state_dict(opt_states[k])
    return json.loads((path / "state.json").read_text())


def load_checkpoint(path: Path, *, policy, value, optimizers: dict, ema: dict | None, rank: int) -> dict:
    """Restore what save_checkpoint wrote (weights_only loads); returns state.json."""
    from safetensors.torch import load_file

    state = load_trainable(path, policy=policy, value=value, optimizers=optimizers)
    if ema is not None:
        if not (path / "ema.safetensors").exists():
            raise StageError(f"checkpoint {path} has no EMA weights but ppo.ema_decay is set; delete it to start over")
        for n, t in load_file(str(path / "ema.safetensors")).items():
            ema[n].copy_(t)
    ranks = torch.load(path / "rng.pt", weights_only=True)["ranks"]
    if rank < len(ranks):
        set_rng_state(ranks[rank])
    return state


# ---- export ----

def export_policy(policy, tokenizer, out_dir: Path, ema: dict | None) -> None:
    """Write the final policy as a plain HF causal LM + tokenizer (EMA weights if kept; LoRA merged)."""
    if ema is not None:
        with torch.no_grad():
            for n, p in trainable_params(policy).items():
                p.copy_(ema[n])
    model = policy.merge_and_unload() if _is_peft(policy) else policy
    tmp = staging_dir(out_dir)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    atomic_replace_dir(tmp, out_dir)
