"""PPO-ptx (InstructGPT): the SFT language-model loss on the demonstrations, mixed into PPO's update
with weight ppo.ptx_coef so the policy keeps what SFT taught it."""
from __future__ import annotations

import torch

from stages.core.errors import StageError
from stages.modeling.chat_format import IGNORE, tokenize_demonstration
from stages.modeling.tensors import pad_rows


def prepare_demonstrations(tokenizer, demos, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, targets) per SFT demonstration, tokenized and cut exactly as SFT does."""
    from data_schemas.records import as_chat

    out = [tokenize_demonstration(tokenizer, as_chat(d.messages), max_length) for d in demos]
    out = [e for e in out if e is not None]
    if not out:
        raise StageError("ppo.ptx_coef > 0 but no SFT demonstration has assistant tokens within sft.max_length")
    return out


def ptx_loss(policy, demos, n: int, seed: int, step: int, pad_id: int, device):
    """Mean next-token loss on the assistant tokens of n seeded-random demonstrations (InstructGPT's γ·E[log π(x)])."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * step)
    picked = [demos[i] for i in torch.randint(len(demos), (n,), generator=g).tolist()]
    input_ids, attention = pad_rows([ids for ids, _ in picked], pad_id)
    labels, _ = pad_rows([targets for _, targets in picked], IGNORE)
    out = policy(input_ids=input_ids.to(device), attention_mask=attention.to(device), labels=labels.to(device),
                 use_cache=False)
    return out.loss
