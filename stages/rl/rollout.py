"""PPO's experience: the prompts it samples for, steps 1 (rollout) and 2 (score) of an iteration,
and the `Rollout` they produce. The loop that uses them is stages/ppo.py."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import NamedTuple

import torch

from stages.core.config_schema import PPOConfig
from stages.core.errors import StageError
from stages.core.runtime import training_attention
from stages.modeling.chat_format import render_prompts
from stages.modeling.generation import generate
from stages.modeling.reward_scoring import normalised
from stages.modeling.tensors import entropy_from_logits, logprobs_from_logits, policy_logits, through_first
from stages.rl.ppo_math import masked_mean
from stages.rl.ppo_models import PPOModels, reference_context, reward_model_scores
from stages.rl.reward_functions import call_reward_fn
from stages.training.data_order import micro_batch_indices


def prepare_prompts(tokenizer, prompts, max_prompt_length: int) -> tuple[list[str], list[str]]:
    """Rendered chat prompts (ending in the assistant header) and their last user turns; prompts
    longer than max_prompt_length tokens are dropped rather than truncated (which would cut the header)."""
    from data_schemas.records import as_chat

    chats = [as_chat(p.messages) for p in prompts]
    texts = render_prompts(tokenizer, chats)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    keep = [i for i, n in enumerate(lengths) if n <= max_prompt_length]
    if not keep:
        raise StageError(f"ppo.prompts: all {len(texts)} prompts are longer than ppo.max_prompt_length "
                         f"({max_prompt_length} tokens); raise it")
    if len(keep) < len(texts):
        print(f"ppo: dropped {len(texts) - len(keep)} of {len(texts)} prompts longer than "
              f"{max_prompt_length} tokens", file=sys.stderr)
    return [texts[i] for i in keep], [chats[i][-1]["content"] for i in keep]


class Samples(NamedTuple):
    """Step 1's output (B rollouts, P prompt + R response positions).

    idx:       (B,) list of the prompts' indices
    input_ids: (B, P+R) left-padded prompt + response (pad after EOS)
    attention: (B, P+R) 1 on prompt tokens and on response tokens up to and including EOS
    positions: (B, P+R) position ids that skip the left padding
    response:  (B, R) sampled token ids a_t;  mask: (B, R) 1 on real response tokens
    has_eos:   (B,) the response ended with EOS
    logprobs, entropy: (B, R) from generation's own logits, or None when scoring recomputes them
    """

    idx: list[int]
    input_ids: torch.Tensor
    attention: torch.Tensor
    positions: torch.Tensor
    response: torch.Tensor
    mask: torch.Tensor
    has_eos: torch.Tensor
    logprobs: torch.Tensor | None
    entropy: torch.Tensor | None


def sample_rollouts(accelerator, policy, tokenizer, texts: list[str], p: PPOConfig, *, seed: int, iteration: int,
                    with_logprobs: bool) -> Samples:
    """Step 1: this rank's prompts of the iteration, answered by the policy (batched, KV-cached).
    With samples_per_prompt k, batch_size / k prompts are drawn and each is answered k times in a row
    (a group, which stays on one rank)."""
    k = p.samples_per_prompt
    prompts = micro_batch_indices(len(texts), seed, iteration - 1, p.batch_size // k, accelerator.num_processes,
                                  accelerator.process_index)
    idx = [i for i in prompts for _ in range(k)]
    return answer(accelerator, policy, tokenizer, texts, idx, p, with_logprobs=with_logprobs)


def answer(accelerator, policy, tokenizer, texts: list[str], idx: list[int], p: PPOConfig, *,
           with_logprobs: bool = False) -> Samples:
    """texts[idx] answered by the policy with PPO's sampling settings, laid out as rollouts."""
    with accelerator.autocast():
        gen = generate(policy, tokenizer, [texts[i] for i in idx], max_new_tokens=p.max_new_tokens,
                       temperature=p.temperature, top_p=p.top_p, max_prompt_length=p.max_prompt_length,
                       with_logprobs=with_logprobs)
    mask = through_first(gen.response, tokenizer.eos_token_id).long()
    attention = torch.cat([gen.prompt_mask, mask], 1)
    return Samples(idx=idx, input_ids=torch.cat([gen.prompt_ids, gen.response], 1), attention=attention,
                   positions=(attention.cumsum(-1) - 1).clamp(min=0), response=gen.response, mask=mask,
                   has_eos=(gen.response == tokenizer.eos_token_id).any(1), logprobs=gen.logprobs,
                   entropy=gen.entropy)


@dataclass
class Rollout:
    """One iteration's experience (B rollouts, P prompt + R response positions).

    input_ids:    (B, P+R) left-padded prompt + response (pad after EOS)
    attention:    (B, P+R) 1 on prompt tokens and on response tokens up to and including EOS
    positions:    (B, P+R) position ids that skip the left padding
    response:     (B, R)   sampled token ids a_t
    mask:         (B, R)   1 on real response tokens
    logprobs:     (B, R)   log π_old(a_t|s_t) of the policy that sampled them
    ref_logprobs: (B, R)   log π_ref(a_t|s_t)
    values:       (B, R)   V_old(s_t); 0 without a value model (ppo.advantage 'group')
    raw_scores:   (B,)     RM score / reward_fn output;  scores: (B,) after shape_scores
    has_eos:      (B,)     the response ended with EOS
    entropy:      ()       mean per-token entropy of π_old over real tokens
    """

    input_ids: torch.Tensor
    attention: torch.Tensor
    positions: torch.Tensor
    response: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    raw_scores: torch.Tensor
    scores: torch.Tensor
    has_eos: torch.Tensor
    entropy: torch.Tensor


def shape_scores(raw: torch.Tensor, stats: dict | None, clip: float | None, missing_eos_penalty: float | None,
                 has_eos: torch.Tensor) -> torch.Tensor:
    """(B,) raw rewards -> the sequence score PPO optimises: normalised with the RM's saved
    statistics, clipped to ±clip, then minus the penalty for a response that never ended."""
    scores = normalised(raw.float(), stats)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    if missing_eos_penalty:
        scores = scores - missing_eos_penalty * (~has_eos).float()
    return scores


def _chunked(fn, n: int, size: int):
    """Run fn(slice) over [0, n) in chunks and concatenate each output (bounds no-grad pass memory)."""
    outs = [fn(slice(i, i + size)) for i in range(0, n, size)]
    return tuple(torch.cat([o[k] for o in outs]) for k in range(len(outs[0])))


def score_rollouts(accelerator, models: PPOModels, policy, value, s: Samples, p: PPOConfig, *, tokenizer,
                   reward_fn, prompts: list[str], stats: dict | None) -> tuple[Rollout, list[str]]:
    """Step 2: one no-grad pass each for the reference log-probs, the values and the reward (the RM's
    score, or reward_fn on the decoded texts), and the policy's log-probs (+ entropy) unless generation
    gave them. `prompts`: the user turns reward_fn sees. Returns the Rollout and the decoded responses."""
    R = s.response.shape[1]
    chunk = max(p.mini_batch_size, 8)  # rows per no-grad pass: bounds activation memory at large B

    def score_chunk(rows):
        args = (s.input_ids[rows], s.attention[rows], s.positions[rows])
        if s.logprobs is not None:
            logp, ent = s.logprobs[rows], s.entropy[rows]
        else:
            logits = policy_logits(policy, *args, R, p.temperature)
            logp, ent = logprobs_from_logits(logits, s.response[rows]), entropy_from_logits(logits)
            del logits
        ref_model, ref_ctx = reference_context(models, policy)
        with ref_ctx:
            ref_logp = logprobs_from_logits(policy_logits(ref_model, *args, R, p.temperature), s.response[rows])
        vals = value(*args, R) if value is not None else torch.zeros_like(ref_logp)
        raw = (reward_model_scores(models, value, *args) if reward_fn is None
               else torch.zeros(len(ent), device=accelerator.device))
        return logp, ref_logp, vals, raw, ent

    # The scoring and training passes use one attention kernel, so their log-probs agree exactly.
    with torch.no_grad(), training_attention(accelerator.device, s.input_ids.shape[1]), accelerator.autocast():
        logprobs, ref_logprobs, values, raw, entropy = _chunked(score_chunk, s.response.shape[0], chunk)
    decoded = tokenizer.batch_decode(s.response, skip_special_tokens=True)
    if reward_fn is not None:
        try:
            raw = torch.tensor(call_reward_fn(reward_fn, prompts, decoded), device=accelerator.device)
        except ValueError as e:
            raise StageError(f"ppo.reward_fn {p.reward_fn}: {e}") from None
    return Rollout(input_ids=s.input_ids, attention=s.attention, positions=s.positions, response=s.response,
                   mask=s.mask, logprobs=logprobs.float(), ref_logprobs=ref_logprobs.float(), values=values.float(),
                   raw_scores=raw.float(), scores=shape_scores(raw, stats, p.reward_clip, p.missing_eos_penalty,
                                                               s.has_eos),
                   has_eos=s.has_eos, entropy=masked_mean(entropy, s.mask)), decoded
