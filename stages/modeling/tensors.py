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


def common_prefix(rows: list[list[int]]) -> int:
    """Length of the tokens every row starts with, capped so each row keeps at least its last token."""
    n = min(len(r) for r in rows) - 1
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return n


def shared_prefix_mask(segment: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
    """(K, W) segment ids -> (K, 1, W, W) bool attention mask, True = may attend.

    Rows lay out a shared start once (segment 0) and then several sequences (segments 1, 2, ...) that
    each continue it. A token sees earlier tokens of its own segment and of segment 0 only, so every
    sequence is computed as if it sat alone after the shared start (its positions must continue the
    start's). `group` (K, W) splits a row further into independent blocks that never see each other,
    each with its own segment 0."""
    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment.device).tril()
    visible = (segment[:, None, :] == 0) | (segment[:, :, None] == segment[:, None, :])
    if group is not None:
        visible &= group[:, :, None] == group[:, None, :]
    return (causal & visible).unsqueeze(1)


def attention_bias(model, mask: torch.Tensor | None):
    """A 4D bool mask as the model's attention takes it: bool for SDPA and flex attention, additive
    (0 / float min) for eager attention, which adds the mask to its scores."""
    if mask is None:
        return None
    config = getattr(getattr(model, "module", model), "config", None)
    if getattr(config, "_attn_implementation", "sdpa") != "eager":
        return mask
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
