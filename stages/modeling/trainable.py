"""Which weights of a model train: fresh LoRA adapters (and the base model under them), frozen lower
layers, and the view of the trainable parameters that optimizers, checkpoints and EMA use."""
from __future__ import annotations

import torch

from stages.core.config_schema import LoRAConfig
from stages.core.errors import StageError


def apply_lora(model, lora: LoRAConfig, task_type: str):
    """Wrap `model` with fresh LoRA adapters (task_type 'CAUSAL_LM' or 'SEQ_CLS', which also trains the score head)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=lora.target_modules, task_type=task_type)
    return get_peft_model(model, cfg)


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def peft_base(model):
    """The model under the LoRA adapters (the model itself when it has none)."""
    return model.get_base_model() if is_peft(model) else model


def freeze_lower_layers(model, n: int) -> None:
    """Stop gradients below the top: the input embeddings and the first n transformer blocks no
    longer train, so backward (and its activation memory) ends above them."""
    if n <= 0:
        return
    total = getattr(model.config, "num_hidden_layers", None)
    blocks = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == total), None)
    if blocks is None:
        raise StageError(f"freeze_layers: cannot find the transformer blocks of {type(model).__name__}")
    if n >= len(blocks):
        raise StageError(f"freeze_layers={n} but the model has {len(blocks)} layers; leave at least one to train")
    model.get_input_embeddings().requires_grad_(False)
    for block in blocks[:n]:
        block.requires_grad_(False)


def trainable_params(module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}
