"""Checks before anything is launched: data validates, models and tokenizers load, memory fits."""
from __future__ import annotations

import os
from dataclasses import dataclass

from stages.core.runtime import resolve_precision

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

    from stages.modeling.loading import resolve_model

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
    has_value = p.advantage == "gae"
    val_tr = (_lora_trainable(mcfg, p.value_lora) if p.value_lora.enabled else n) if has_value else 0
    # policy (+ reference unless LoRA shares the base), value (unless advantage 'group'), reward model
    frozen = n + (0 if p.lora.enabled else n) + (n if has_value and p.value_lora.enabled else 0)
    b = train_bytes(pol_tr + val_tr, frozen, p.mini_batch_size, seq)
    out.append(MemoryEstimate("ppo", (4 if has_value else 3) * n, pol_tr + val_tr, b,
                              f"policy+ref+{'value+' if has_value else ''}RM, minibatch {p.mini_batch_size} x {seq} "
                              "tokens"))
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
        if cfg.reward.eval_data is not None:
            lines.append(f"reward.eval_data: {len(load_preferences(cfg.reward.eval_data))} preference records")
    if "ppo" in stages:
        lines.append(f"ppo.prompts: {len(load_prompts(cfg.ppo.prompts))} prompts")
        if cfg.ppo.monitor.every:
            lines.append(f"ppo.monitor.prompts: {len(load_prompts(cfg.ppo.monitor.prompts))} prompts")
    if "baseline" in stages or "compare" in stages:
        lines.append(f"compare.prompts: {len(load_prompts(cfg.compare.prompts))} prompts")
    return lines


def check_models(cfg) -> str:
    from stages.modeling.loading import load_tokenizer

    tok = load_tokenizer(cfg.model, cfg.trust_remote_code)
    return f"model {cfg.model}: tokenizer ok ({len(tok)} tokens, pad={tok.pad_token!r}, eos={tok.eos_token!r})"


# ---- references: every path, model and module a selected stage will open ----

def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_like_path(ref: str) -> bool:
    """A local path, never a hub name: absolute, ./ ../ ~, a trailing slash, an existing path, or
    more than one '/' (hub names are `name` or `owner/name`)."""
    return (ref.startswith(("/", "./", "../", "~")) or ref in (".", "..") or ref.endswith("/")
            or os.path.exists(ref) or ref.count("/") > 1)


def check_model_ref(ref: str, what: str) -> str:
    """Resolve where a model will come from without loading it; a one-line ModelError if it cannot.

    A local folder must hold config.json and safetensors weights. A hub name must be in the local
    Hugging Face cache when offline (HF_HUB_OFFLINE); online it is looked up once, with no retries."""
    from pathlib import Path

    from stages.modeling.loading import ALIASES, ModelError

    if ref in ALIASES:
        return f"{what}: {ref} (embedded)"
    if looks_like_path(ref):
        path = Path(ref).expanduser()
        if not path.exists():
            raise ModelError(f"{what}: model folder {ref} does not exist")
        if not path.is_dir():
            raise ModelError(f"{what}: {ref} is a file, not a model folder")
        if not (path / "config.json").is_file():
            raise ModelError(f"{what}: {ref} has no config.json, so it is not a Hugging Face model folder")
        if not any(path.glob("*.safetensors")):
            raise ModelError(f"{what}: {ref} has no *.safetensors weights (only safetensors are loaded)")
        return f"{what}: {ref} (local folder)"
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(ref)
    except HFValidationError:
        raise ModelError(f"{what}: {ref!r} is neither a local model folder nor a valid hub name (owner/name)") from None
    if isinstance(try_to_load_from_cache(ref, "config.json"), str):
        return f"{what}: {ref} (hub, cached)"
    if _offline():
        raise ModelError(f"{what}: {ref} is not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE "
                         f"is set: download it first or point to a local folder")
    from huggingface_hub import model_info
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        model_info(ref, timeout=10)
    except RepositoryNotFoundError:
        raise ModelError(f"{what}: no model {ref!r} on the Hugging Face hub (or it is private)") from None
    except Exception as e:  # no network, a proxy, a timeout: one line instead of minutes of retries
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ModelError(f"{what}: cannot reach the Hugging Face hub to fetch {ref!r} ({detail}); "
                         f"use a local folder, or set HF_HUB_OFFLINE=1 if it is cached") from None
    return f"{what}: {ref} (hub)"


def _check_file(path: str, what: str, config_relative: bool = False) -> None:
    """`path` is a readable UTF-8 file. config_relative: a relative path is looked up as the stage will
    (the current directory, then the repo root: `resolve_config_path`)."""
    from pathlib import Path

    from stages.core.config_schema import resolve_config_path
    from stages.core.errors import StageError

    p = Path(path).expanduser()
    if config_relative:
        p = resolve_config_path(p)
    if not p.is_file():
        raise StageError(f"{what}: {path}: " + ("is a folder, not a file" if p.is_dir() else "no such file"))
    try:
        p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise StageError(f"{what}: {path}: not UTF-8 text") from None
    except OSError as e:
        raise StageError(f"{what}: {path}: {e.strerror or e}") from None


# accelerate backends the stages cannot run yet, with what fails (seen on one H200, bench/gpu_check.py).
# RLHF_ALLOW_PENDING_BACKENDS=1 lets them through, for working on them.
PENDING_BACKENDS = {
    "DEEPSPEED": "accelerate.prepare needs a DeepSpeed micro-batch size, and checkpoints, the spike guard and "
                 "generation are not written for ZeRO engines",
}


def _check_accelerate_config(path: str) -> str:
    """The file exists and accelerate can read it (the launcher's own reader, not a guess at its schema),
    and its backend is one the stages run. Returns the backend (accelerate's distributed_type)."""
    import contextlib
    import io

    from accelerate.commands.config.config_args import load_config_from_file

    from pipeline.config import ConfigError

    _check_file(path, "launch.accelerate_config")
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            acc = load_config_from_file(path)
    except Exception as e:  # yaml, TypeError for unknown keys, ValueError for missing ones
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"config error: launch.accelerate_config: {path}: not an accelerate config ({detail})") from None
    backend = str(getattr(acc.distributed_type, "value", acc.distributed_type))
    where = f"config error: launch.accelerate_config: {path}:"
    if backend in PENDING_BACKENDS and os.environ.get("RLHF_ALLOW_PENDING_BACKENDS") != "1":
        raise ConfigError(f"{where} distributed_type {backend} is not supported by the stages yet "
                          f"({PENDING_BACKENDS[backend]}); use DDP or FSDP2, e.g. configs/accelerate/ddp_8gpu.yaml")
    if backend == "FSDP":
        fsdp = acc.fsdp_config or {}
        if int(fsdp.get("fsdp_version", 1)) != 2:
            raise ConfigError(f"{where} the stages run FSDP2 only (torch's fully_shard); set fsdp_config.fsdp_version: 2")
        if str(fsdp.get("fsdp_cpu_ram_efficient_loading", False)).lower() == "true":
            raise ConfigError(f"{where} fsdp_cpu_ram_efficient_loading: true loads weights on rank 0 only, but PPO's "
                              "frozen reference and reward model are loaded whole on every rank; set it to false")
    return backend


def check_references(cfg, selected: list[str]) -> list[str]:
    """Everything the selected stages will open, resolved now: model folders and hub names, this
    run's stage outputs (checked by the orchestrator), the reward function, the baseline prompt, the
    accelerate config. Raises a one-line error; returns what was checked, for the preflight listing."""
    from stages.core.errors import StageError
    from stages.core.run_folder import STAGES
    from stages.rl.reward_functions import load_reward_fn

    lines = []
    if cfg.launch.accelerate_config:
        if _check_accelerate_config(cfg.launch.accelerate_config) == "FSDP":
            from pipeline.config import ConfigError
            from stages.core.sharding import fsdp_unsupported

            why = fsdp_unsupported(cfg, selected)
            if why:
                raise ConfigError(f"config error: {why}")
        lines.append(f"launch.accelerate_config: {cfg.launch.accelerate_config}")

    def model(ref: str | None, what: str, allowed_stages=STAGES) -> None:
        if ref is None or ref in allowed_stages:
            return
        lines.append(check_model_ref(ref, what))

    if "sft" in selected:
        model(cfg.model, "model", ())
    if "reward" in selected:
        model(cfg.reward.init_from or cfg.model, "reward.init_from")
    if "ppo" in selected:
        p = cfg.ppo
        if p.reward_fn:
            try:
                load_reward_fn(p.reward_fn)
            except ValueError as e:
                raise StageError(f"ppo.{e}") from None
            lines.append(f"ppo.reward_fn: {p.reward_fn} (imports)")
        else:
            model(p.reward_model, "ppo.reward_model")
        model(p.policy, "ppo.policy")
        for i, ref in enumerate(p.monitor.judges):
            model(ref, f"ppo.monitor.judges[{i}]")
        if p.advantage == "gae":
            model(p.value_init, "ppo.value_init", (*STAGES, "policy"))
    if "baseline" in selected:
        model(cfg.baseline.model or cfg.model, "baseline.model", ())
        _check_file(cfg.baseline.prompt_file, "baseline.prompt_file", config_relative=True)
    if "compare" in selected:
        for i, ref in enumerate(cfg.compare.models):
            model(ref, f"compare.models[{i}]")
        for i, ref in enumerate(cfg.compare.judges):
            model(ref, f"compare.judges[{i}]")
        if cfg.compare.human_labels:
            from stages.core.config_schema import resolve_config_path
            from stages.evaluation.human_labels import read_labels

            _check_file(cfg.compare.human_labels, "compare.human_labels", config_relative=True)
            n = len(read_labels(resolve_config_path(cfg.compare.human_labels)))  # a bad row: file:line: field
            lines.append(f"compare.human_labels: {cfg.compare.human_labels} ({n} labels)")
        model(cfg.compare.reference, "compare.reference")
        if "baseline" in cfg.compare.models or "baseline" in selected:
            _check_file(cfg.baseline.prompt_file, "baseline.prompt_file", config_relative=True)
    return lines


def check_writable(run_dir) -> None:
    """The run folder can be created and written, checked without leaving anything behind (for
    --dry-run, and before pre-flight so bad input leaves no empty run folder): a temp file is created
    and dropped in the nearest existing folder (os.access is no test: root passes it on /proc)."""
    import tempfile
    from pathlib import Path

    from stages.core.errors import StageError

    probe = Path(run_dir)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise StageError(f"cannot write the run folder {run_dir}: Not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".rlhf-write-check-"):
            pass
    except OSError as e:
        raise StageError(f"cannot write the run folder {run_dir}: {e.strerror or e}") from None
