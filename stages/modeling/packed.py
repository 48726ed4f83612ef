"""Faster fp32 decoding on CPU: Linear weights pre-packed once for oneDNN.

A decoding step multiplies a handful of rows (one new token per sequence) by every weight of the
model. torch's default CPU path (MKL sgemm) re-packs each weight into its blocked layout on every
such call, so a step costs several reads of the whole model. oneDNN's linear with a weight packed in
advance skips that, as torch.compile's CPU freezing does. Measured on a 2-core AMD EPYC (AVX2 only),
SmolLM2-135M in fp32, 2 threads: one decoding step of 8 rows 0.22 s -> 0.15 s, and 60 answers of 48
tokens sampled 30 at a time 51 s -> 42 s (`bench/bench_generate.py` runs it beside packing off).

`packed_linears(model)` is a context for generation only (no autograd): inside it every plain
`nn.Linear` of the model runs on its packed weight (one with an instance-level forward of its own,
such as an accelerate hook's, is left as it is); outside, nothing has changed. A trainable weight
is packed afresh on entering the context (~0.6 s for all of SmolLM2), since an optimizer step may
change it in place without a trace (the fused AdamW kernel leaves the version counter alone); a
frozen weight's packed copy is kept, outside the module so copying or saving the model never sees it.

It applies only to a CPU model computing in fp32 (under bf16 autocast the matmuls already take the
bf16 kernels), with ordinary (not sharded) weights, and torch built with the oneDNN ops; results
equal the unpacked path's to fp32 rounding. `RLHF_PACKED_LINEAR=0` turns it off.
"""
from __future__ import annotations

import os
import weakref
from contextlib import contextmanager

import torch

ENV = "RLHF_PACKED_LINEAR"
_FROZEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Linear -> (weight, version, packed)


def _ops_available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and ops is not None
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


def _packable(linear) -> bool:
    if type(linear) is not torch.nn.Linear or "forward" in vars(linear):  # an instance forward (e.g. a hook)
        return False
    w = linear.weight
    return (type(w) in (torch.Tensor, torch.nn.Parameter) and w.device.type == "cpu" and w.dtype == torch.float32
            and w.dim() == 2 and (linear.bias is None or linear.bias.dtype == torch.float32))


def _to_pack(model) -> list[torch.nn.Linear]:
    """The Linear layers `packed_linears` will pack: none where packing does not apply."""
    if os.environ.get(ENV, "1") == "0" or not _ops_available() or torch.is_autocast_enabled("cpu"):
        return []
    return [m for m in model.modules() if _packable(m)]


def applies(model) -> bool:
    """Whether `packed_linears` will pack this model (see the module docstring)."""
    return bool(_to_pack(model))


def _pack(linear: torch.nn.Linear, rows_hint: int) -> torch.Tensor:
    w = linear.weight
    if w.requires_grad:
        return torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows_hint)
    cached = _FROZEN.get(linear)
    if cached is None or cached[0] is not w or cached[1] != w._version:
        cached = (w, w._version, torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows_hint))
        _FROZEN[linear] = cached
    return cached[2]


def _packed_forward(linear: torch.nn.Linear, packed: torch.Tensor):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or torch.is_grad_enabled():  # not the case packing was made for
            return torch.nn.functional.linear(x, linear.weight, linear.bias)
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, linear.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], out.shape[-1])
    return forward


@contextmanager
def packed_linears(model, rows_hint: int = 8):
    """Run `model`'s plain Linear layers on packed weights inside the block (see the module docstring);
    a no-op where it does not apply. rows_hint: the rows per call to pack for (the batch size)."""
    patched = _to_pack(model)
    with torch.no_grad():
        for m in patched:
            m.forward = _packed_forward(m, _pack(m, max(1, rows_hint)))
    try:
        yield model
    finally:
        for m in patched:
            del m.forward  # back to nn.Linear.forward
