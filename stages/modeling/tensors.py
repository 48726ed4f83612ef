"""Small tensor chores every stage needs, written once: padding token lists into a batch, the
"through the first EOS" mask, log-probs and entropy from logits, the packed layouts that compute
a batch's shared start once (common_prefix, shared_start_layout, shared_prefix_mask, pack_left_padded,
and `policy_logits`, which runs a batch that way), bin-packing examples into rows (pack_examples),
and splitting scoring work into token-bounded passes (token_passes).

Shapes: B rows, T positions, V vocabulary.
"""
from __future__ import annotations

from typing import NamedTuple

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


def shared_start_layout(rows: list[list[int]], shared: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """Rows that begin with the same `shared` tokens, laid out back to back with that start once:
    -> (ids, positions, segments, starts). The start has segment 0 and positions 0..shared-1; row b's
    own tokens follow with segment b + 1 and the positions they have in the row (continuing the
    start's). starts[b] is where row b's own tokens begin, so its token t >= shared sits at
    starts[b] + t - shared. `shared_prefix_mask(segments)` makes each row see the start and itself."""
    ids, pos, seg, starts = list(rows[0][:shared]), list(range(shared)), [0] * shared, []
    for b, row in enumerate(rows):
        starts.append(len(ids))
        ids.extend(row[shared:])
        pos.extend(range(shared, len(row)))
        seg.extend([b + 1] * (len(row) - shared))
    return ids, pos, seg, starts


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
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return bias.masked_fill(~mask, torch.finfo(torch.float32).min)


class PackedRows(NamedTuple):
    """Left-padded rows (B, T) laid out as one row of N tokens (see `pack_left_padded`).

    input_ids, position_ids: (1, N)
    attention_mask:          (1, 1, N, N) bool, True = may attend
    index:                   (B, T) where in the packed row each padded position's state is: that token's
                             own, or for a padding position the row's nearest earlier token (its first
                             token, for left padding); hidden[0, index] is the padded layout again."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    index: torch.Tensor


# Above this many real tokens, one packed row's (N, N) attention would cost more than the padded
# rows' B·T², so such batches (large GPU batches) keep the padded layout.
PACKED_MAX_TOKENS = 2048


def pack_left_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedRows | None:
    """Left-padded rows (prompt + response, positions counting attended tokens only) as one packed row:
    no padding, and the rows' common start (with a chat template, the system prompt and user header)
    laid out once, each row's own tokens after it under a mask that lets a row see only the shared
    start and itself. Every row's tokens get the states they get in the padded layout (tested), for
    fewer tokens computed. None when the batch is too large for one row (PACKED_MAX_TOKENS)."""
    attended = attention_mask.bool()
    lengths = attended.sum(1)
    if int(lengths.sum()) > PACKED_MAX_TOKENS:
        return None
    rows = [input_ids[b][attended[b]].tolist() for b in range(input_ids.shape[0])]
    shared = common_prefix(rows) if len(rows) > 1 else 0
    ids, pos, seg, starts = shared_start_layout(rows, shared)
    device = input_ids.device
    rank = (attended.long().cumsum(1) - 1).clamp(min=0)  # each position's attended-token number
    start = torch.tensor(starts, device=device)[:, None]
    index = torch.where(rank < shared, rank, start + rank - shared)
    return PackedRows(torch.tensor([ids], device=device), torch.tensor([pos], device=device),
                      shared_prefix_mask(torch.tensor([seg], device=device)), index)


def policy_logits(model, input_ids, attention_mask, position_ids, response_len: int, temperature: float):
    """-> (B, R, V) the logits that predicted each response token, divided by the sampling temperature
    so log-probs are those of the distribution the tokens were drawn from (top-p aside). The rows run
    packed (no padding, their common start once; `pack_left_padded`) unless the batch is too large."""
    packed = pack_left_padded(input_ids, attention_mask)
    if packed is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                    logits_to_keep=response_len + 1)
        return out.logits[:, :-1].float() / temperature
    keep = packed.index[:, -response_len - 1:-1]
    out = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                attention_mask=attention_bias(model, packed.attention_mask), logits_to_keep=keep.reshape(-1))
    return out.logits[0].view(*keep.shape, -1).float() / temperature


def pack_examples(lengths: list[int], max_length: int) -> list[list[int]]:
    """First-fit-decreasing bins of example indices, each bin's total length <= max_length.
    Examples are never split, so no sequence loses its context."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_length - lengths[i])
    return bins


def token_passes(sizes: list[int], max_tokens: int, max_items: int | None = None) -> list[list[int]]:
    """Consecutive runs of indices into `sizes`, in order, each holding at most max_tokens of size and
    max_items items; an item larger than max_tokens gets a run of its own. How a scoring loop splits
    its work into forward passes."""
    runs: list[list[int]] = []
    used = 0
    for i, n in enumerate(sizes):
        if not runs or len(runs[-1]) == max_items or used + n > max_tokens:
            runs.append([])
            used = 0
        runs[-1].append(i)
        used += n
    return runs
