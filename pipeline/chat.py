"""`rlhf chat MODEL_OR_RUN [--baseline]`: a terminal chat with a model, or with a model and the
dialogue-prompted baseline side by side (each keeps its own history; both get the same user turns).

MODEL_OR_RUN is a run folder (its ppo model, else its sft model, and its config), a model folder,
or a hub name. Commands: /reset clears the conversation, /quit (or end of input) exits.
"""
from __future__ import annotations

import shutil
import textwrap
from itertools import zip_longest
from pathlib import Path

import yaml

from stages.core.config_schema import RunConfig
from stages.core.errors import StageError
from stages.core.run_folder import MODEL_SUBDIR, stage_dir
from stages.evaluation.baseline_outputs import BASELINE
from stages.evaluation.responders import ChatModel, model_label, responder_for

HELP = "/reset clears the conversation, /quit exits"


def resolve_target(model_arg: str) -> tuple[str, Path | None, str]:
    """(model path, run folder or None, label). A run folder holds config.yaml and stage folders."""
    path = Path(model_arg)
    if path.is_dir() and (path / "config.yaml").exists() and not (path / "config.json").exists():
        for stage in ("ppo", "sft"):
            model = stage_dir(path, stage) / MODEL_SUBDIR
            if (model / "config.json").exists():
                return str(model), path, stage
        raise StageError(f"{path} is a run folder with no ppo or sft model yet: run `rlhf sft` (and `rlhf ppo`) first")
    return model_arg, None, model_label(model_arg)


def load_chat_config(config_path: str | None, run_dir: Path | None, model_path: str) -> RunConfig:
    if config_path:
        from pipeline.config import load_config

        return load_config(config_path)
    if run_dir is not None:
        return RunConfig.from_resolved(yaml.safe_load((run_dir / "config.yaml").read_text()))
    # No run: the baseline is the same model, steered by the dialogue prompt instead of its chat template.
    return RunConfig(model=model_path)


def side_by_side(blocks: list[tuple[str, str]], width: int) -> str:
    """Two (label, text) blocks as columns when the terminal is wide enough, else one after the other."""
    col = (width - 3) // 2
    if len(blocks) == 1 or col < 30:
        return "\n".join(f"[{label}] {text}" for label, text in blocks)
    columns = []
    for label, text in blocks:
        lines = [f"[{label}]"]
        for para in (text or "(empty)").splitlines() or [""]:
            lines += textwrap.wrap(para, col) or [""]
        columns.append(lines)
    return "\n".join(f"{a:<{col}} | {b}" for a, b in zip_longest(*columns, fillvalue=""))


def chat_main(args) -> int:
    import torch

    model_path, run_dir, label = resolve_target(args.model)
    if run_dir is None:
        from pipeline.preflight import check_model_ref

        check_model_ref(model_path, "chat")  # a missing folder or an offline hub name: one line, at once
    cfg = load_chat_config(args.config, run_dir, model_path)
    if args.max_new_tokens < 1:
        raise StageError("--max-new-tokens must be at least 1")
    decoding = cfg.compare.decoding.model_copy(update={"max_new_tokens": args.max_new_tokens, "batch_size": 1})
    common = dict(precision=cfg.precision, trust_remote_code=cfg.trust_remote_code)
    responders = [ChatModel(label, model_path, decoding, **common)]
    if args.baseline:
        responders.append(responder_for(BASELINE, cfg, run_dir, decoding))
    torch.manual_seed(cfg.seed)
    histories: list[list[dict]] = [[] for _ in responders]
    names = " and ".join(f"{r.name} ({r.model_path})" if r.kind == "chat" else f"{r.name} (dialogue-prompted "
                         f"{r.model_path})" for r in responders)
    print(f"chatting with {names}; {HELP}", flush=True)
    width = shutil.get_terminal_size((100, 24)).columns
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            break
        if not line:
            continue
        if line == "/quit":
            break
        if line == "/reset":
            histories = [[] for _ in responders]
            print("(conversation cleared)", flush=True)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}: {HELP}", flush=True)
            continue
        blocks = []
        for responder, history in zip(responders, histories):
            history.append({"role": "user", "content": line})
            reply = responder.respond([history])[0]
            history.append({"role": "assistant", "content": reply})
            blocks.append((responder.name, reply))
        print(side_by_side(blocks, width), flush=True)
    return 0
