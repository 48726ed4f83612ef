"""The prompted baseline's text format, as pure string functions: the dialogue prompt file, the
transcript "User: ...\\nAssistant:" an untuned LM continues, and where its reply stops."""
from __future__ import annotations

import hashlib
import os

from stages.core.config_schema import REPO_ROOT, resolve_config_path
from stages.core.errors import StageError


def load_prompt_text(prompt_file: str | os.PathLike) -> str:
    """The prompt file's text (a relative path: the current directory first, then the repo root)."""
    path = resolve_config_path(prompt_file)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StageError(f"baseline.prompt_file: {prompt_file} not found (also looked in {REPO_ROOT})") from None
    except UnicodeDecodeError:
        raise StageError(f"baseline.prompt_file: {path} is not UTF-8 text") from None
    if not text.strip():
        raise StageError(f"baseline.prompt_file: {path} is empty")
    return text.strip() + "\n"


def prompt_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def render_transcript(preamble: str, messages: list[dict], user_prefix: str = "User:",
                      assistant_prefix: str = "Assistant:") -> str:
    """The dialogue prompt, then the conversation as plain turns, ending with an open assistant turn.
    A system message has no turn marker in the prompted format, so it joins the preamble."""
    head = preamble.rstrip("\n")
    lines = []
    for m in messages:
        if m["role"] == "system":
            head += "\n" + m["content"].strip()
        elif m["role"] == "user":
            lines.append(f"{user_prefix} {m['content'].strip()}")
        else:
            lines.append(f"{assistant_prefix} {m['content'].strip()}")
    return head + "\n\n" + "\n".join(lines) + f"\n{assistant_prefix}"


def stop_strings_for(user_prefix: str = "User:", assistant_prefix: str = "Assistant:") -> list[str]:
    """A prompted LM keeps writing the transcript; the next turn marker on a new line ends its reply."""
    return [f"\n{user_prefix}", f"\n{assistant_prefix}"]


def truncate_at_stop(text: str, stops: list[str]) -> str:
    """Cut `text` at the earliest stop string (the stop text itself is dropped), then trim whitespace."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut].strip()
