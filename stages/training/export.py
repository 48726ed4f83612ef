"""A training stage's export: the trained model as a plain Hugging Face folder (safetensors +
tokenizer [+ json files]), what the next stage and any HF tool load; rank 0 writes it."""
from __future__ import annotations

from pathlib import Path

from stages.core.sharding import full_model_state
from stages.modeling.loading import save_model_folder


def export_trained(accelerator, model, tokenizer, out_dir: Path, *, lora: bool, adapter: bool = False,
                   merged: bool = True, extra_files: dict | None = None) -> None:
    """A training stage's export: out_dir/model, the full model (LoRA merged in, unless `merged` is
    off), with `extra_files` beside it; with LoRA and `adapter`, also out_dir/adapter."""
    if lora:
        _export_lora(accelerator, model, tokenizer, out_dir / "adapter" if adapter else None,
                     out_dir / "model" if merged else None, extra_files)
    else:
        _save_full(accelerator, model, tokenizer, out_dir / "model", extra_files)


def _save_full(accelerator, model, tokenizer, out_dir: Path, extra_files: dict | None = None) -> None:
    """The full model, gathered from FSDP/ZeRO-3 shards, written by rank 0."""
    raw = accelerator.unwrap_model(model)
    state_dict = full_model_state(accelerator, model)  # every rank takes part in the gather
    if accelerator.is_main_process:
        save_model_folder(raw, tokenizer, out_dir, state_dict, extra_files)
    accelerator.wait_for_everyone()


def _export_lora(accelerator, model, tokenizer, adapter_dir: Path | None, merged_dir: Path | None,
                 extra_files: dict | None = None) -> None:
    """Save the LoRA adapter (if adapter_dir) and/or the merged full model (if merged_dir), rank 0."""
    raw = accelerator.unwrap_model(model)
    if accelerator.is_main_process and adapter_dir is not None:
        save_model_folder(raw, tokenizer, adapter_dir)
    if accelerator.is_main_process and merged_dir is not None:
        save_model_folder(raw.merge_and_unload(), tokenizer, merged_dir, extra_files=extra_files)
    accelerator.wait_for_everyone()
