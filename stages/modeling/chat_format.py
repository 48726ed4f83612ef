"""How conversations become tokens: the chat template, prompts that end in the assistant header,
and demonstrations with their assistant-only targets.

The template is SmolLM2's, unchanged in output, with {% generation %} markers around assistant
replies: transformers' `return_assistant_tokens_mask` reads them, which is how SFT (and PPO-ptx)
find the tokens to train on.
"""
from __future__ import annotations

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IGNORE = -100  # the target of a position no loss is taken on


def render_prompts(tokenizer, prompts: list[list[dict]]) -> list[str]:
    """Chat messages -> prompt strings ending with the assistant header."""
    return [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]


def tokenize_demonstration(tokenizer, messages, max_length: int) -> tuple[list[int], list[int]] | None:
    """(input_ids, targets): targets are the ids on assistant tokens and IGNORE elsewhere. Right-truncated
    to max_length; None if no assistant token survives the truncation."""
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = list(enc["input_ids"])[:max_length]
    mask = list(enc["assistant_masks"])[:max_length]
    targets = [t if m else IGNORE for t, m in zip(ids, mask)]
    if not any(m for m in mask[1:]):  # the first token is never predicted
        return None
    return ids, targets
