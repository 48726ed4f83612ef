"""How a stage uses the machine: the precision it computes in and the threads it runs on.

Precision (`precision:` in a config):
  - `auto` (the default) is bf16 mixed precision where the device does bf16 natively (a CUDA GPU
    that supports it, or a CPU with AVX512-BF16 or AMX, as torch itself reports), fp32 otherwise.
  - bf16 means autocast: trainable weights, optimizer state, log-softmax, log-prob ratios,
    advantages, KL and losses stay fp32; matmuls run in bf16. A frozen model (PPO's reference and
    reward model, every generation-only model) keeps its matmul weights in bf16 and the rest in fp32
    (`autocast_layout`), so under autocast it computes exactly what the fp32-master trainable copy
    computes, at about half the memory and without re-casting its weights on every call.

The accelerator (`make_accelerator`) is accelerate's, set to the run's precision.

Threads: `accelerate launch` gives a single process one intra-op thread unless told otherwise; the
launcher (pipeline/launcher.py) passes `intra_op_threads()` per process, and every summary records
what the stage actually ran with (`runtime_info`).
"""
from __future__ import annotations

import os
from contextlib import nullcontext

from stages.core.errors import StageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_bf16_native() -> bool:
    """torch's own check for bf16 matmul hardware on this CPU (AVX512-BF16 or AMX tiles)."""
    import torch

    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(check()) for check in checks if check is not None)


def resolve_precision(requested: str) -> str:
    """'auto' -> 'bf16' where the device does bf16 natively, else 'fp32'; anything else as given."""
    if requested != "auto":
        return requested
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_bf16_native() else "fp32"


def resolved(cfg):
    """The run config with `precision` made concrete for this machine (stages call this first, so
    what they record and fingerprint is what they ran)."""
    precision = resolve_precision(cfg.precision)
    return cfg if precision == cfg.precision else cfg.model_copy(update={"precision": precision})


def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[resolve_precision(precision)]


# Rows up to this many tokens train faster on CPU with the math attention kernel than with torch's
# fused (flash) one; see training_attention.
MATH_ATTENTION_MAX_WIDTH = 128


def training_attention(device, width: int):
    """The attention kernel for a training forward and backward of rows `width` tokens wide.

    On CPU, torch's fused (flash) attention backward is slow for short rows: on a bf16 reward-model
    step (16 replies in rows of 116 tokens, SmolLM2-135M, 2 threads) it took ~1 s of 3.3 s, against
    ~0.1 s for its forward, and the math kernel (matmul + softmax) made the step ~0.5 s faster. On
    SFT's 256-token packed rows the fused kernel stays ahead (1.59 vs 1.78 s/step). So short rows
    on CPU get the math kernel; longer rows, and GPUs, keep torch's own choice."""
    import torch

    if torch.device(device).type != "cpu" or width > MATH_ATTENTION_MAX_WIDTH:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def autocast(precision: str, device):
    """The autocast context for a concrete precision on `device` (a no-op for fp32)."""
    import torch

    precision = resolve_precision(precision)
    if precision == "fp32":
        return nullcontext()
    dev = device.type if hasattr(device, "type") else str(device)
    return torch.autocast(dev, dtype=torch_dtype(precision))


def autocast_layout(model, precision: str):
    """Prepare a frozen model for autocast: every Linear weight and bias in the low-precision dtype,
    embeddings and norms in fp32. Autocast would cast the Linear weights to that dtype on every
    call anyway (it caches casts only for trainable weights), so results are unchanged. An output
    projection tied to the input embeddings gets its own cast copy, leaving the embedding fp32."""
    import torch

    precision = resolve_precision(precision)
    model.requires_grad_(False)
    if precision == "fp32":
        return model
    dtype = torch_dtype(precision)
    embedding = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if module.weight is embedding:
            module.weight = torch.nn.Parameter(embedding.detach().to(dtype), requires_grad=False)
        else:
            module.weight.data = module.weight.data.to(dtype)
        if module.bias is not None:
            module.bias.data = module.bias.data.to(dtype)
    return model


def generation_logprobs_exact(precision: str) -> bool:
    """Whether log-probs read from generation's KV-cached logits may stand in for a full forward pass.
    In fp32 the two agree within 1e-4 nats per token; under bf16 they differ by up to ~0.2 nats (SmolLM2,
    measured), enough to make a first PPO ratio or a same-model KL visibly non-zero."""
    return resolve_precision(precision) == "fp32"


def rank_sum(accelerator):
    """A function summing a tensor over the ranks (data parallel), or None with one process, where
    there is nothing to sum and callers keep their single-process arithmetic exactly as it was."""
    if accelerator.num_processes == 1:
        return None
    return lambda x: accelerator.reduce(x.detach(), reduction="sum")


def make_accelerator(cfg):
    """accelerate's Accelerator at the run's (concrete) precision."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]
    # Several processes but no GPU (`accelerate launch --multi_gpu` on a CPU machine): accelerate only
    # forms the gloo process group in its CPU mode; without it every rank would train alone as world 1.
    cpu_ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed:
        # A second stage in the same process (tests, notebooks) at another precision: accelerate keeps one
        # global state and refuses to change it. The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
    try:
        accelerator = Accelerator(mixed_precision=mixed, cpu=cpu_ddp)
    except ValueError as e:
        raise StageError(f"precision {cfg.precision!r} is not usable here: {str(e).splitlines()[0]}") from None
    from stages.core.sharding import autocast_only, enable_cpu_fsdp

    if cpu_ddp:
        enable_cpu_fsdp(accelerator)  # an FSDP config on CPU processes shards, as it would on GPUs
    autocast_only(accelerator)
    return accelerator


# ---- threads ----

def available_cores() -> int:
    """Physical cores this process may run on (its CPU affinity, capped by the physical core count)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        if physical:
            cores = min(cores, physical)
    except ImportError:
        pass
    return max(1, cores)


def intra_op_threads(processes_on_node: int) -> int:
    """Threads per stage process: the user's OMP_NUM_THREADS if set, else the node's cores split
    evenly over its processes."""
    user = os.environ.get("OMP_NUM_THREADS", "").strip()
    if user.isdigit() and int(user) > 0:
        return int(user)
    return max(1, available_cores() // max(1, processes_on_node))


def runtime_info(precision: str) -> dict:
    """What a stage ran with, for its summary (and so the manifest)."""
    import torch

    return {"precision": resolve_precision(precision), "threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


# ---- memory ----

class HeapTrim:
    """Keeps a training loop's resident memory flat. Batches whose shapes change every step (packed
    rows) leave freed blocks of many sizes inside glibc's heap, where the next step's other sizes do
    not fit and nothing is handed back: the reward stage's RSS grew step after step with its live
    tensors constant (bench/rm_malloc_probe.py). malloc_trim(0) returns the free heap to the OS.

    It is not free: the next step faults every returned page back in. Trimming after every step
    made a bf16 reward-model step ~0.6 s slower here (2.7 vs 2.1 s), as does a fixed mmap threshold.
    So the heap is trimmed only once the RSS at a step's end has grown `slack` over its reference:
    the RSS at the end of step `settle` (model, optimizer state and one step's freed activations
    all resident), raised to what a trim leaves if a trim cannot get below it (a larger working set,
    not fragmentation). A run whose heap reuses its blocks never pays for a trim."""

    def __init__(self, slack: float = 0.10, settle: int = 3):
        self._trim = _malloc_trim()
        self.slack, self.settle = slack, settle
        self.steps = self.trims = 0
        self.reference: int | None = None

    def step(self) -> None:
        if self._trim is None:
            return
        self.steps += 1
        rss = _rss_bytes()
        if self.steps < self.settle:
            return
        if self.reference is None:
            self.reference = rss
        elif rss > self.reference * (1 + self.slack):
            self._trim(0)
            self.trims += 1
            self.reference = max(self.reference, _rss_bytes())


def _rss_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 elsewhere, where there is no trim either)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _malloc_trim():
    """glibc's malloc_trim, or None where there is none (macOS, musl)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
