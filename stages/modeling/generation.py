"""Sampling from a causal LM, written once for every caller (PPO's rollouts, the responders of
baseline, compare, chat and labelling): the `generate()` settings, the KV-cached call, the
response masked after its first EOS, and the log-probs read from the logits generation computed.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TopPLogitsWarper

from stages.modeling.packed import packed_linears
from stages.modeling.tensors import entropy_from_logits, logprobs_from_logits, mask_after_eos


class NucleusFilter(LogitsProcessor):
    """Top-p (nucleus) filtering at `temperature`, as transformers' TopPLogitsWarper does it after its
    TemperatureLogitsWarper, without sorting the whole vocabulary at every step.

    A token is kept when the probability of the tokens above it is below p (the most likely token
    always). Only the `candidates` most likely tokens are sorted (torch.topk); a row whose nucleus
    they do not hold (their mass short of p) is filtered by the full sort instead. On a 49k vocabulary
    the full sort of 60 rows took 145 ms per step on a 2-core AMD EPYC, the top 256 8 ms. The nucleus
    is the same as transformers' up to fp32 rounding of a cumulative sum at its edge (tested).
    The scores come back unscaled, the dropped tokens at -inf: generate's own temperature warper runs
    after this processor."""

    def __init__(self, top_p: float, temperature: float, candidates: int = 256):
        self.top_p, self.temperature, self.candidates = top_p, temperature, candidates

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scaled = scores / self.temperature  # what TemperatureLogitsWarper computes
        k = min(self.candidates, scores.shape[-1])
        top, idx = scaled.softmax(-1).topk(k, dim=-1)  # (B, k), most likely first
        cum = top.cumsum(-1)
        keep = (cum - top) < self.top_p  # the mass above each candidate is below p
        keep[:, 0] = True
        drop = torch.ones_like(scores, dtype=torch.bool).scatter_(1, idx, ~keep)
        short = cum[:, -1] < self.top_p + 1e-4  # the nucleus may reach past the candidates
        if short.any():  # transformers' own full-sort filter for these rows
            drop[short] = TopPLogitsWarper(self.top_p, filter_value=-float("inf"))(input_ids, scaled[short]).isneginf()
        return scores.masked_fill(drop, -float("inf"))


def generate_kwargs(tokenizer, *, max_new_tokens: int, temperature: float, top_p: float,
                    stop_strings: list[str] | None = None, with_logits: bool = False) -> dict:
    """The keyword arguments of `model.generate`: temperature 0 is greedy; otherwise nucleus sampling
    (through `NucleusFilter`) with top-k off. The model's own generation_config (which may set a
    temperature, top-p or top-k) never mixes in: greedy clears them. with_logits: also return the raw
    logits of every step."""
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, use_cache=True)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
        if top_p < 1.0:
            kwargs["logits_processor"] = LogitsProcessorList([NucleusFilter(top_p, temperature)])
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stop_strings:
        kwargs.update(stop_strings=stop_strings, tokenizer=tokenizer)
    if with_logits:  # raw logits, before temperature and top-p
        kwargs.update(output_logits=True, return_dict_in_generate=True)
    return kwargs


class Sampled(NamedTuple):
    """What `sample_ids` returns (B rows, R new tokens).

    response: (B, R) sampled ids, pad after the first EOS (the EOS itself is kept)
    logprobs: (B, R) log p(a_t|s_t) at `logprob_temperature` (top-p aside), read from generation's own
              logits; None unless asked for
    entropy:  (B, R) entropy of that distribution, in nats; None unless asked for
    """

    response: torch.Tensor
    logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def sample_ids(model, tokenizer, input_ids, attention_mask, *, max_new_tokens: int, temperature: float,
               top_p: float, stop_strings: list[str] | None = None, logprob_temperature: float | None = None,
               with_entropy: bool = False, cache=None) -> Sampled:
    """KV-cached sampling after (B, P) padded prompt ids (see `Sampled`). `cache`: a prefilled KV
    cache of a prefix every row shares. Log-probs are read one (B, V) step at a time, never all
    R x V in fp32 at once. On an fp32 CPU model the Linear layers run on packed weights
    (`stages.modeling.packed`)."""
    kwargs = generate_kwargs(tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             stop_strings=stop_strings, with_logits=logprob_temperature is not None)
    if cache is not None:
        kwargs["cache"] = cache  # transformers 5: `past_key_values` is deprecated in generate()
    with torch.no_grad(), packed_linears(model, rows_hint=input_ids.shape[0]):
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    sequences = out if logprob_temperature is None else out.sequences
    response = mask_after_eos(sequences[:, input_ids.shape[1]:], tokenizer.eos_token_id, tokenizer.pad_token_id)
    if logprob_temperature is None:
        return Sampled(response)
    logprobs, entropy = [], []
    for t, step in enumerate(out.logits):
        scaled = step.float() / logprob_temperature
        logprobs.append(logprobs_from_logits(scaled, response[:, t]))
        if with_entropy:
            entropy.append(entropy_from_logits(scaled))
    return Sampled(response, torch.stack(logprobs, 1), torch.stack(entropy, 1) if with_entropy else None)


class Generation(NamedTuple):
    """What `generate` returns (B rows, P prompt positions, R new tokens).

    prompt_ids:  (B, P) left-padded prompt ids
    prompt_mask: (B, P) 1 on prompt tokens
    response:    (B, R) sampled ids, pad after the first EOS (the EOS itself is kept)
    logprobs:    (B, R) log π(a_t|s_t) at the sampling temperature (top-p aside), read from the logits
                 generation computed anyway; None unless asked for
    entropy:     (B, R) entropy of that distribution, in nats; None unless asked for
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response: torch.Tensor
    logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def generate(model, tokenizer, texts: list[str], *, max_new_tokens: int, temperature: float, top_p: float,
             max_prompt_length: int = 1024, stop_strings: list[str] | None = None,
             with_logprobs: bool = False) -> Generation:
    """Batched, left-padded, KV-cached sampling of prompt texts; returns a `Generation` (5 fields, the
    last two None unless with_logprobs). Run it inside the stage's autocast context: a trainable
    model's low-precision weight casts are then made once per call, not per token."""
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_prompt_length,
                    add_special_tokens=False).to(model.device)
    out = sample_ids(model, tokenizer, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                     temperature=temperature, top_p=top_p, stop_strings=stop_strings,
                     logprob_temperature=(temperature or 1.0) if with_logprobs else None, with_entropy=with_logprobs)
    return Generation(enc["input_ids"], enc["attention_mask"], *out)
