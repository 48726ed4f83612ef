"""What compare scores responses with, each model loaded once: the reward model's score (the win
rates' judge) and the summed log-probs of a response under a model (for the KL to the reference).

Both compute what they need and no more, as the training stages do: the RM scores all models'
replies to one prompt as a group, with the prompt computed once and no padding (the reward stage's
layout); the log-probs are read as PPO reads its rollouts', with the batch's common start once and
the vocabulary projection only at response positions."""
from __future__ import annotations

import torch

from stages.evaluation.responders import Sample
from stages.modeling.chat_format import render_prompts
from stages.modeling.reward_scoring import grouped_scores, reply_rows
from stages.modeling.tensors import (PACKED_MAX_TOKENS, logprobs_from_logits, pad_rows, policy_logits,
                                     token_passes)

# A judging pass holds about this many replies' worth of tokens per decoding.batch_size row.
TOKENS_PER_ROW = 128


def response_logprob_sums(model, samples: list[Sample], pad_id: int, batch_size: int) -> list[float]:
    """Sum of log p(response token) (temperature 1, no top-p) under `model` for each sample's exact
    prompt + response tokens. The rows are laid out as PPO's rollouts (prompt left-padded, response
    after it, positions counting real tokens only, as in generation) in passes of at most batch_size
    rows and PACKED_MAX_TOKENS tokens, so `policy_logits` runs them packed."""
    sums: list[float] = []
    sizes = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    for run in token_passes(sizes, PACKED_MAX_TOKENS, batch_size):
        chunk = [samples[i] for i in run]
        prompt, prompt_mask = pad_rows([s.prompt_ids for s in chunk], pad_id, left=True)
        response, response_mask = pad_rows([s.response_ids or [pad_id] for s in chunk], pad_id)
        response_mask *= torch.tensor([[bool(s.response_ids)] for s in chunk], dtype=response_mask.dtype)
        attention = torch.cat([prompt_mask, response_mask], 1)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        device = next(model.parameters()).device
        with torch.no_grad():
            logits = policy_logits(model, torch.cat([prompt, response], 1).to(device), attention.to(device),
                                   positions.to(device), response.shape[1], 1.0)
            logp = logprobs_from_logits(logits, response.to(device)) * response_mask.to(device)
        sums.extend(logp.sum(1).tolist())
    return sums


def reward_model_judge(rm, tokenizer, conversations: list[list[dict]], responses: dict[str | int, list[str]],
                       batch_size: int, max_length: int) -> dict[str | int, list[float]]:
    """The RM's scalar for each (prompt, response) of each model: responses[label][i] answers
    conversations[i]. Each is scored on exactly the row the reward stage trains on and PPO scores
    (chat-template prompt + response tokens + EOS, cut by `reply_rows` alone), read at its last token.
    The rows of one prompt (every model's responses, every sample) are scored as one group: the prompt
    is computed once, and identical rows are scored once, so identical answers tie exactly. Groups are
    packed into rows of max_length tokens (a longer group gets a row of its own), so little is padded."""
    prompt_texts = render_prompts(tokenizer, conversations)
    groups: dict[str, dict[tuple[int, ...], int]] = {}  # prompt text -> its distinct rows, numbered
    where: dict[str, list[tuple[str, int]]] = {}
    for label, texts in responses.items():
        where[label] = []
        for prompt, text in zip(prompt_texts, texts, strict=True):
            rows = groups.setdefault(prompt, {})
            where[label].append((prompt, rows.setdefault(tuple(reply_rows(tokenizer, prompt, [text], max_length)[0]),
                                                         len(rows))))
    keys = list(groups)
    scored = dict(zip(keys, grouped_scores(rm, [[list(r) for r in groups[k]] for k in keys], tokenizer.pad_token_id,
                                           batch_size * TOKENS_PER_ROW, width=max_length)))
    return {label: [scored[prompt][k] for prompt, k in places] for label, places in where.items()}
