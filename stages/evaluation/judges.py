"""What compare scores responses with, each model loaded once: the reward model's score (the win
rates' judge) and the summed log-probs of a response under a model (for the KL to the reference)."""
from __future__ import annotations

import torch

from stages.evaluation.responders import Sample
from stages.modeling.chat_format import render_prompts
from stages.modeling.reward_scoring import padded_scores, reply_rows
from stages.modeling.tensors import logprobs_from_logits, pad_rows


def response_logprob_sums(model, samples: list[Sample], pad_id: int, batch_size: int) -> list[float]:
    """Sum of log p(response token) under `model` for each sample's exact prompt + response tokens.
    Rows are right-padded, so real tokens keep positions 0..T-1 as they had during generation."""
    sums: list[float] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        ids, mask = pad_rows([s.prompt_ids + s.response_ids for s in chunk], pad_id)
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False).logits
        logp = logprobs_from_logits(logits[:, :-1], ids[:, 1:].to(model.device))  # (B, T-1): log p(token t+1)
        for r, s in enumerate(chunk):
            p, n = len(s.prompt_ids), len(s.response_ids)
            sums.append(float(logp[r, p - 1:p - 1 + n].sum()))
    return sums


def reward_model_judge(rm, tokenizer, conversations: list[list[dict]], responses: list[str], batch_size: int,
                       max_length: int) -> list[float]:
    """The RM's scalar for each (prompt, response), on exactly the rows the reward stage trained on and
    PPO scores: chat-template prompt + response tokens + EOS, right-padded, read at the last real token."""
    prompt_texts = render_prompts(tokenizer, conversations)
    rows = [reply_rows(tokenizer, p, [r], max_length)[0] for p, r in zip(prompt_texts, responses)]
    out: list[float] = []
    for start in range(0, len(rows), batch_size):
        ids, mask = pad_rows(rows[start:start + batch_size], tokenizer.pad_token_id)
        with torch.no_grad():
            out.extend(padded_scores(rm, ids.to(rm.device), mask.to(rm.device)).tolist())
    return out
