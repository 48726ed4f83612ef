"""A reward model's score, read in one place.

The score of a reply is the score head's output at the reply's last token, the <|im_end|> (EOS) that
closes it, on `prompt (chat template, generation header) + reply + EOS`: the rows the reward stage
trains on (`reply_rows`), PPO scores after generating, and compare judges. Three batch layouts read
that one number, each where it pays:

  padded rows       `padded_scores`: HF's classifier pools the last non-pad token. Reward training
                    with reward.padding_free=false.
  packed rows       `packed_scores`: a group's prompt once, its replies after it under a mask, groups
                    back to back in rows (`pack_reply_groups`), the head's per-token output read at
                    each reply's end. Reward training's default, and compare's judging
                    (`grouped_scores`: every model's answers to a prompt as one group): no compute
                    on padding or on repeated prompts.
  left-padded rows  `last_token_scores` through `ValueModel`: the backbone, with the head applied only
                    at the last attended token. PPO, whose value model is the RM's backbone and head
                    (and, with value LoRA, shares the RM's weights).
"""
from __future__ import annotations

import torch

from stages.core.errors import StageError
from stages.modeling.tensors import (attention_bias, common_prefix, pack_examples, pack_left_padded,
                                     shared_prefix_mask, shared_start_layout, token_passes)
from stages.modeling.trainable import peft_base


def reply_rows(tokenizer, prompt_text: str, replies: list[str], max_length: int) -> list[list[int]]:
    """Token ids of prompt + reply + EOS for each reply, at most max_length each. Where that is too
    long, the prompt loses its oldest tokens, the same ones for every reply: the replies are then
    judged on one context, and the reward stage computes that context once for all of them (cutting
    each row to its own length would leave the replies different contexts and nothing to share).
    A reply that alone exceeds max_length also loses its own oldest tokens, so the reply's end, where
    the reward is read, always survives."""
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    reply_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in replies]
    room = max(0, max_length - max(len(r) for r in reply_ids))  # prompt tokens every row can keep
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - room):]
    return [(prompt_ids + r)[-max_length:] for r in reply_ids]


def padded_scores(model, input_ids, attention_mask) -> torch.Tensor:
    """(B,) scores of right-padded rows: the classifier's own pooling at the last non-pad token."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits[:, 0].float()


def score_head(model) -> torch.nn.Module:
    """The classifier's `score` layer (through DDP, peft and accelerate wrappers)."""
    inner = getattr(model, "module", model)
    head = next((m for name, m in inner.named_modules() if name.rsplit(".", 1)[-1] == "score"), None)
    if head is None:
        raise StageError(f"{type(inner).__name__} has no `score` head for padding-free scoring; "
                         "set reward.padding_free=false")
    return head


def packed_scores(model, input_ids, position_ids, ends, attention_mask=None) -> torch.Tensor:
    """(R,) scores of R replies packed into rows (K, W); ends (R,) is the flat index (row·W + column) of
    each reply's last token. `attention_mask` (K, 1, W, W) bool, True = may attend, says which tokens
    each token sees (the reward stage's prefix-shared rows); without it, transformers masks
    block-diagonally where the positions restart at 0. The classifier pools one position per row, so
    the score head's per-token output is read instead. Calling the full model (not its parts) keeps
    DDP's gradient hooks in play."""
    per_token = []
    hook = score_head(model).register_forward_hook(lambda _m, _i, out: per_token.append(out))
    try:
        model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_bias(model, attention_mask),
              use_cache=False)
    finally:
        hook.remove()
    return per_token[-1].flatten(0, 1)[ends, 0].float()


def laid_out_size(group: list[list[int]], shared: int) -> int:
    """Tokens a group of rows takes laid out with its first `shared` tokens once."""
    return shared + sum(len(r) - shared for r in group)


def pack_reply_groups(groups: list[list[list[int]]], pad_id: int,
                      width: int = 0) -> dict[str, torch.Tensor]:
    """Groups of token rows (the rows of a group: one prompt, each followed by its own reply) laid out
    padding-free, prefix-shared: -> input_ids, position_ids (K, W), attention_mask (K, 1, W, W) bool and
    ends (R,), R = all rows of all groups in order.

    A group is laid out once as its rows' common start followed by each row's own tokens, and groups
    are bin-packed, whole, into K rows no longer than the longest group or `width` (W). The mask lets
    each reply see the prompt and its own earlier tokens, not the other replies or other groups; each
    reply's positions continue from the prompt's, so every reply is computed as if it sat alone after
    the prompt (tested equal to the padded layout), while the prompt is computed once per group, not
    once per reply. A row's unused tail is a segment of its own. ends[r]: the flat index (row·W +
    column) of row r's last token, where its score is read (`packed_scores`)."""
    prefixes = [common_prefix(g) for g in groups]
    sizes = [laid_out_size(g, p) for g, p in zip(groups, prefixes)]
    bins = pack_examples(sizes, max(max(sizes), width))
    width = max(sum(sizes[j] for j in b) for b in bins)
    ids = torch.full((len(bins), width), pad_id)
    pos = torch.zeros((len(bins), width), dtype=torch.long)
    seg = torch.zeros((len(bins), width), dtype=torch.long)  # within a group: 0 = its prompt, i = reply i
    grp = torch.zeros((len(bins), width), dtype=torch.long)  # group of each position, 0 = the row's tail
    first = [0]  # index of each group's first row among all R
    for g in groups:
        first.append(first[-1] + len(g))
    ends = torch.zeros(first[-1], dtype=torch.long)
    for k, b in enumerate(bins):
        at = 0
        for j in b:
            g, p = groups[j], prefixes[j]
            laid_ids, laid_pos, laid_seg, starts = shared_start_layout(g, p)
            span = slice(at, at + sizes[j])
            ids[k, span], pos[k, span], seg[k, span] = (torch.tensor(x) for x in (laid_ids, laid_pos, laid_seg))
            grp[k, span] = j + 1
            for i, (r, start) in enumerate(zip(g, starts)):
                ends[first[j] + i] = k * width + at + start + len(r) - p - 1
            at += sizes[j]
        pos[k, at:] = torch.arange(width - at)
    return {"input_ids": ids, "position_ids": pos, "attention_mask": shared_prefix_mask(seg, grp), "ends": ends}


def grouped_scores(model, groups: list[list[list[int]]], pad_id: int, max_tokens: int,
                   width: int = 0) -> list[list[float]]:
    """The scores of groups of rows, computed packed (`pack_reply_groups`, rows of at least `width`)
    in passes of about `max_tokens` laid-out tokens (a group larger than that gets a pass of its own):
    each group's shared prompt once, and padding only at the rows' ends. -> one list of scores per
    group, in row order."""
    device = next(model.parameters()).device
    sizes = [laid_out_size(g, common_prefix(g)) for g in groups]
    out: list[list[float]] = [[] for _ in groups]
    for js in token_passes(sizes, max_tokens):
        t = pack_reply_groups([groups[j] for j in js], pad_id, width)
        with torch.no_grad():
            flat = packed_scores(model, t["input_ids"].to(device), t["position_ids"].to(device), t["ends"].to(device),
                                 t["attention_mask"].to(device)).tolist()
        at = 0
        for j in js:
            out[j] = flat[at:at + len(groups[j])]
            at += len(groups[j])
    return out


def normalised(scores: torch.Tensor, stats: dict | None) -> torch.Tensor:
    """RM scores on the normalised scale (scores - mean) / std of `stats`, or unchanged for None. PPO's
    rewards and a value that starts from the RM both go through here, so their scales agree."""
    return scores if stats is None else (scores - stats["mean"]) / stats["std"]


class ValueModel(torch.nn.Module):
    """V(s_t) for every response position: a sequence classifier's backbone, with its one-output
    score head applied to each hidden state (InstructGPT initialises it from the RM).

    `normalise` {"mean", "std"}: values are (head - mean) / std, a fixed affine map, not a weight.
    PPO passes the RM's score statistics when the value starts from the RM and rewards are
    normalised with them, so the first values are on the rewards' scale. Without it they sat ~mean/std
    (~1.3 on the quickstart) above every return, and the value clip (±cliprange_value per update) kept
    that bias in the last tokens' advantages for many iterations."""

    def __init__(self, seq_cls, normalise: dict | None = None):
        super().__init__()
        base = peft_base(seq_cls)
        self.backbone = getattr(base, base.base_model_prefix)   # e.g. LlamaForSequenceClassification.model
        self.head = base.score                                   # a ModulesToSaveWrapper under LoRA
        object.__setattr__(self, "seq_cls", seq_cls)            # kept for disable_adapter, not a submodule
        self.normalise = normalise

    @property
    def _no_split_modules(self):
        """The blocks FSDP's transformer auto-wrap shards one by one: the backbone's own."""
        return getattr(peft_base(self.seq_cls), "_no_split_modules", None)

    def hidden(self, input_ids, attention_mask, position_ids):
        """(B, T, H) hidden states of left-padded rows, computed packed (no padding, the rows' common
        start once; `pack_left_padded`) unless the batch is too large for one row."""
        packed = pack_left_padded(input_ids, attention_mask)
        if packed is None:
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state
        h = self.backbone(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                          attention_mask=attention_bias(self.backbone, packed.attention_mask)).last_hidden_state
        return h[0, packed.index]

    def forward(self, input_ids, attention_mask, position_ids, response_len: int):
        """-> (B, R) values of the states before each response token (the positions predicting it)."""
        h = self.hidden(input_ids, attention_mask, position_ids)[:, -response_len - 1:-1]
        return normalised(self.head(h).squeeze(-1).float(), self.normalise)


def last_token_scores(model: ValueModel | torch.nn.Module, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """(B,) the score head on the last attended token of each (left-padded) row."""
    vm = model if isinstance(model, ValueModel) else ValueModel(model)
    h = vm.hidden(input_ids, attention_mask, position_ids)
    last = attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(1)
    return vm.head(h[torch.arange(h.shape[0], device=h.device), last]).squeeze(-1).float()
