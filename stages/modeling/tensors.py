"""Small tensor chores every stage needs, written once: padding token lists into a batch, the
"through the first EOS" mask, and log-probs and entropy from logits.

Shapes: B rows, T positions, V vocabulary.
"""
from __future__ import annotations

import torch


def pad_rows(rows: list[list[int]], pad_id: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids (B, T), attention mask (B, T)), T = the longest row; padded on the right
    (training, scoring: real tokens keep positions 0..n-1) or with `left` on the left (generation)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        at = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, at] = torch.tensor(r, dtype=torch.long)
        mask[i, at] = 1
    return ids, mask


def through_first(ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """(B, T) bool: True up to and including the first `token_id` of each row (everywhere if none)."""
    hit = (ids == token_id).int()
    return (torch.cumsum(hit, dim=1) - hit) == 0


def mask_after_eos(response: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Replace every token after the first EOS with pad (the EOS itself is kept)."""
    return response.masked_fill(~through_first(response, eos_id), pad_id)


def response_lengths(response: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """(B,) tokens of each sampled row that belong to the reply: through the first EOS, and before
    the first pad (generation pads the rows that finished early)."""
    return (through_first(response, eos_id) & through_first(response, pad_id) & (response != pad_id)).sum(1)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) labels -> (B, T) log p(label). Gathers before normalising to save memory."""
    logits = logits.float()
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(…, V) logits -> (…) entropy H = logsumexp(z) − Σ softmax(z)·z, in nats."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)
