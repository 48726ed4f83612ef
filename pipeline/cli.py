"""`rlhf`: the command line. Every user-facing error is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import os
import sys

from pipeline.config import ConfigError

STAGE_HELP = {
    "sft": "supervised fine-tuning on demonstrations",
    "reward": "train the reward model on preference pairs / rankings",
    "ppo": "PPO against the reward model with a per-token KL penalty to the SFT reference",
    "baseline": "generate with the dialogue-prompted (untuned) baseline",
    "compare": "compare models: RM win rate, KL, toxicity, length, samples, plots",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`rlhf run: error: ...`) and exit code 2, like every
    other error of the CLI; `--help` still prints the full usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML, e.g. configs/quickstart.yaml")
    # default=[]: without it argparse lists an empty `nargs="*"` positional as a required argument.
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. ppo.kl_coef=0.05 name=exp2")
    p.add_argument("--force", action="store_true", help="re-run the selected stages even if done and unchanged")


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="rlhf", description="InstructGPT-style RLHF: SFT -> reward model -> PPO, "
                                 "plus a dialogue-prompted baseline and a comparison report.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)

    p = sub.add_parser("run", help="run the pipeline: sft -> reward -> ppo -> baseline -> compare")
    _add_run_args(p)
    p.add_argument("--stages", help="comma-separated subset, e.g. sft,reward")
    p.add_argument("--from", dest="from_stage", help="start at this stage (earlier ones must be done)")
    p.add_argument("--dry-run", action="store_true", help="validate config, data and models, print the plan, run nothing")

    for stage, help_ in STAGE_HELP.items():
        p = sub.add_parser(stage, help=help_)
        _add_run_args(p)

    p = sub.add_parser("models", help="provision models (the embedded default, the tiny test model)")
    msub = p.add_subparsers(dest="models_command", required=True)
    mp = msub.add_parser("prepare", help="convert the embedded SmolLM2-135M-Instruct GGUF into a cached HF folder")
    mp.add_argument("--tiny", action="store_true", help="also create the tiny random test model")
    mp.add_argument("--force", action="store_true", help="rebuild even if cached")

    p = sub.add_parser("config", help="show or validate a config")
    csub = p.add_subparsers(dest="config_command", required=True)
    for name, h in (("show", "print the resolved config"), ("validate", "validate a config and exit")):
        cp = csub.add_parser(name, help=h)
        cp.add_argument("config")
        cp.add_argument("overrides", nargs="*", default=[])

    from pipeline import data_cli

    data_cli.add_parser(sub)

    p = sub.add_parser("chat", help="chat with a model or run, optionally side by side with the prompted baseline")
    p.add_argument("model", help="a run folder (uses its ppo model, else sft), a model folder, or a hub name")
    p.add_argument("--baseline", action="store_true", help="send each turn to the dialogue-prompted baseline too")
    p.add_argument("--config", help="run config for decoding and the baseline prompt (default: the run's)")
    p.add_argument("--max-new-tokens", type=int, default=128)

    from pipeline import label

    label.add_parser(sub)
    return ap


def _dispatch(args) -> int:
    if args.command == "models":
        from stages.modeling.loading import prepare_default_model, prepare_tiny_model

        print(prepare_default_model(force=args.force))
        if args.tiny:
            print(prepare_tiny_model(force=args.force))
        return 0
    if args.command == "config":
        from pipeline.config import load_config, to_yaml

        cfg = load_config(args.config, args.overrides)
        print(to_yaml(cfg) if args.config_command == "show" else f"{args.config}: ok")
        return 0
    if args.command in ("run", *STAGE_HELP):
        from pipeline.config import load_config
        from pipeline.orchestrator import run_pipeline

        cfg = load_config(args.config, args.overrides)
        stages = [args.command] if args.command != "run" else (args.stages.split(",") if args.stages else None)
        return run_pipeline(cfg, stages=stages, from_stage=getattr(args, "from_stage", None), force=args.force,
                            dry_run=getattr(args, "dry_run", False), config_path=args.config)
    if args.command == "chat":
        from pipeline.chat import chat_main

        return chat_main(args)
    return args.handler(args)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    # Overrides may also follow options (`rlhf run CONFIG --stages sft ppo.kl_coef=0.1`), which
    # argparse alone would reject once the positional list has been closed by an option.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    from data_schemas.errors import DataError
    from stages.core.errors import ModelError, StageError, os_error_line

    try:
        code = _dispatch(args)
    except (ConfigError, DataError, ModelError, StageError) as e:
        msg = str(e)
        print(msg if msg.startswith(("config error", "error")) else f"error: {msg}", file=sys.stderr)
        code = 2
    except BrokenPipeError:  # `rlhf config show | head`: the reader left, nothing is wrong
        # Point stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except OSError as e:  # the filesystem: a full disk, a read-only or missing folder
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
