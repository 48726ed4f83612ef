"""Sharded training (FSDP2) as the stages meet it: full tensors for checkpoints and exports, loading
full tensors back into shards, gathering the weights once for generation, and FSDP2 on CPU.

Under FSDP2 every parameter (and every optimizer state of the same shape) is a DTensor: each rank
holds a slice. A checkpoint or export needs the full tensor, which every rank must take part in
gathering; a resume needs each rank's slice of a full tensor read from disk. Checkpoints keep the
same format whatever the backend.

FSDP2 on CPU: accelerate forms FSDP only on accelerators; on a CPU machine it silently runs an
FSDP config as plain data parallel (`AcceleratorState` keeps `MULTI_CPU`). torch's `fully_shard`
itself works on CPU over gloo, so `enable_cpu_fsdp` turns accelerate's FSDP path on there: that is
how the stages' sharded code paths are tested on a machine without a GPU.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from stages.core.errors import StageError


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def enable_cpu_fsdp(accelerator) -> None:
    """An FSDP launch (ACCELERATE_USE_FSDP) on several CPU processes: switch accelerate from plain
    data parallel to its FSDP2 path, as it would be on GPUs. FSDP1 is refused with one line."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables
    if plugin.fsdp_version != 2:
        raise StageError("FSDP on CPU needs fsdp_version: 2 in the accelerate config (torch's fully_shard); "
                         f"this one has fsdp_version: {plugin.fsdp_version}")
    from accelerate.state import PartialState

    accelerator.state.fsdp_plugin = plugin
    # Both singletons: every later AcceleratorState() copies PartialState's fields over its own.
    accelerator.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP


def autocast_only(accelerator) -> None:
    """Under FSDP, mixed precision is the stages' own autocast, as under DDP: parameters stay fp32
    when gathered, matmuls run in bf16 under autocast, and frozen models are laid out to match
    (`runtime.autocast_layout`). accelerate would otherwise give FSDP2 a MixedPrecisionPolicy that
    computes with every weight in bf16, norms and embeddings included, and the policy would no longer
    compute what its frozen reference computes: the first PPO iteration's KL was 3.6e-4 nats instead
    of 0 (tiny model, bf16, 2 CPU ranks). The cost is fp32 all-gathers (2x the bytes of bf16)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        accelerator.state.fsdp_plugin.mixed_precision_policy = None


def backend_name(accelerator) -> str:
    """'single', 'ddp', 'fsdp2', 'fsdp1', 'deepspeed': what the stage ran under, for its summary."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return f"fsdp{accelerator.state.fsdp_plugin.fsdp_version}"
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "single" if accelerator.num_processes == 1 else "ddp"


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor whole, on CPU: a DTensor is gathered from its shards (a collective: every rank
    calls this, with the same names in the same order); a plain tensor is detached."""
    out = {}
    for name, t in tensors.items():
        t = t.detach()
        if is_dtensor(t):
            t = t.full_tensor()
        out[name] = t.to("cpu").contiguous()
    return out


def copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into `target`, which may be a DTensor shard: each rank keeps its own slice
    of `full` (no communication; every rank read the same file)."""
    with torch.no_grad():
        if is_dtensor(target):
            from torch.distributed.tensor import distribute_tensor

            local = distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements,
                                      src_data_rank=None).to_local()
            target.to_local().copy_(local.to(target.to_local().device))
        else:
            target.copy_(full.to(target.device, target.dtype))


def optimizer_state_full(optimizer) -> dict:
    """An optimizer's state_dict with every DTensor state gathered whole (collective)."""
    state = optimizer.state_dict()
    if not any(is_dtensor(v) for s in state["state"].values() for v in s.values()):
        return state
    return {**state, "state": {i: full_tensors(s) for i, s in state["state"].items()}}


def load_optimizer_state_full(optimizer, saved: dict) -> None:
    """Load a state_dict of whole tensors into an optimizer whose parameters may be DTensors: each
    per-parameter state the parameter's shape is sliced as the parameter is."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    params = [p for g in inner.param_groups for p in g["params"]]
    optimizer.load_state_dict(saved)
    for p in params:
        if not is_dtensor(p):
            continue
        st = inner.state.get(p, {})
        for k, v in list(st.items()):
            if isinstance(v, torch.Tensor) and not is_dtensor(v) and tuple(v.shape) == tuple(p.shape):
                from torch.distributed.tensor import distribute_tensor

                st[k] = distribute_tensor(v.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)


def full_model_state(accelerator, model) -> dict | None:
    """The whole model's state dict (every rank calls; rank 0 gets it, on CPU). Under FSDP2 each
    DTensor is gathered in turn and only rank 0 keeps it, and a tied weight stays one tensor so
    save_pretrained writes it once; otherwise accelerate's own gather (DDP, ZeRO-3)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return accelerator.get_state_dict(model)
    state, seen = {}, {}
    for name, t in model.state_dict(keep_vars=True).items():  # keep_vars: a tied weight is one object
        if id(t) in seen:  # a tied weight (lm_head = embed_tokens): one tensor, so save_pretrained sees the tie
            state[name] = seen[id(t)]
            continue
        whole = t.full_tensor() if is_dtensor(t) else t  # every rank, in the same order
        seen[id(t)] = state[name] = whole.detach().to("cpu").contiguous() if accelerator.is_main_process else None
    return state if accelerator.is_main_process else None


def fsdp_modules(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered_for_generation(model):
    """Generation on an FSDP2 model with its weights gathered once: without this, every decoding
    step would all-gather every layer again (and free it after). Weights are resharded on exit.
    A no-op for a model that is not sharded."""
    mods = fsdp_modules(model)
    if not mods:
        yield model
        return
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
    for m in mods:
        m.unshard()
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def fsdp_unsupported(cfg, stages) -> str | None:
    """What `stages` would run under FSDP that the stages do not run sharded yet, as one line naming
    the setting, or None. Pre-flight asks before launching; each stage asks again on its own start."""
    if "ppo" in stages and cfg.ppo.monitor.every:
        return ("ppo.monitor.every: the over-optimisation monitor is not supported under FSDP yet; "
                "set ppo.monitor.every=0 or use DDP")
    lora = [f"{s}.lora" for s in ("sft", "reward") if s in stages and getattr(cfg, s).lora.enabled]
    if "ppo" in stages:
        lora += [f"ppo.{k}" for k in ("lora", "value_lora") if getattr(cfg.ppo, k).enabled]
    if lora:
        return f"{lora[0]}.enabled: LoRA is not supported under FSDP yet; train the full model or use DDP"
    return None


def refuse_unsupported(accelerator, cfg, stage: str) -> None:
    """A stage launched under FSDP with a setting it does not run sharded fails here, in one line."""
    why = fsdp_unsupported(cfg, [stage]) if backend_name(accelerator).startswith("fsdp") else None
    if why:
        raise StageError(f"{stage}: {why}")
