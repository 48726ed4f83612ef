"""`rlhf label`: a local web page where a person compares two models' responses, A/B, and every
choice becomes a preference pair that `rlhf reward` trains on.

    rlhf label serve --run runs/exp1             # the compare stage's saved generations
    rlhf label serve --generations a.jsonl b.jsonl --out labels.jsonl
    rlhf label serve --config configs/tiny.yaml --models baseline,ppo   # generate first, then label
    rlhf label summary labels.jsonl              # each model's human win rate, Wilson 95% CI

The comparison order and the left/right sides are fixed by `--seed`, and each choice is appended
with one write + fsync before the page moves on, so killing the server loses nothing and a restart
resumes at the first comparison without a label in the file. The records (comparisons, the labels
file, win rates) are in label_records.py; the page and its HTTP API in label_server.py and label_static/.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_schemas.errors import DataError
from pipeline.label_records import (Generation, format_summary, load_generations, load_run_generations,
                                    plan_comparisons, read_labels, ties_path, win_rates)
from pipeline.label_server import LabelSession, is_loopback, make_server

# ---- generating on the fly (models instead of saved generations) ----

def generate_for_labels(config_path: str, model_refs: list[str], folder: Path) -> list[Generation]:
    """Each model answers the config's compare.prompts with compare.decoding, seeded by `seed`.

    The answers are saved in `folder` and reused on a restart: sampling again would give new texts,
    new comparison ids, and a session that could not resume.
    """
    from data_schemas.files import atomic_write_jsonl
    from data_schemas.records import as_chat
    from pipeline.config import load_config
    from pipeline.rundir import run_dir_for
    from stages.evaluation.baseline_outputs import load_eval_prompts
    from stages.evaluation.responders import responder_for, unique_labels

    cfg = load_config(config_path)
    prompts = None
    gens: list[Generation] = []
    for ref, name in zip(model_refs, unique_labels(model_refs)):
        path = folder / f"{name}.jsonl"
        if not path.exists():
            import torch

            prompts = prompts or load_eval_prompts(cfg.compare.prompts, cfg.compare.samples_per_prompt)
            print(f"generating: {name} answers {len(prompts)} prompts ...", flush=True)
            responder = responder_for(ref, cfg, run_dir_for(cfg), cfg.compare.decoding, needed_by="label", name=name)
            torch.manual_seed(cfg.seed)
            texts = responder.respond([as_chat(p.messages) for p in prompts])
            responder.close()
            atomic_write_jsonl(path, [{"prompt_id": p.id, "prompt": as_chat(p.messages), "model": name, "response": t}
                                      for p, t in zip(prompts, texts)])
        gens += load_generations(path, model=name)
    return gens


# ---- CLI ----

def _load_for_serve(args) -> tuple[list[Generation], Path, list[str] | None]:
    """(generations, labels file, models to keep) from whichever source the flags name."""
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    sources = [bool(args.run), bool(args.generations), bool(args.config)]
    if sum(sources) != 1:
        raise DataError("rlhf label serve: pass one of --run RUN_DIR, --generations FILE ..., or --config CONFIG --models A,B")
    if args.run:
        out = Path(args.out or Path(args.run) / "label" / "labels.jsonl")
        return load_run_generations(args.run), out, models
    if args.generations:
        if not args.out:
            raise DataError("rlhf label serve: --out FILE is required with --generations")
        return [g for f in args.generations for g in load_generations(f)], Path(args.out), models
    if not models or len(models) < 2:
        raise DataError("rlhf label serve --config: --models needs at least two models, e.g. --models baseline,ppo")
    from pipeline.config import load_config
    from pipeline.rundir import run_dir_for

    out = Path(args.out or run_dir_for(load_config(args.config)) / "label" / "labels.jsonl")
    gens = generate_for_labels(args.config, models, out.with_name(f"{out.stem}.generations"))
    return gens, out, None  # generated models are named by their short labels; keep them all


def serve_main(args) -> int:
    gens, out, models = _load_for_serve(args)
    comps = plan_comparisons(gens, seed=args.seed, models=models, limit=args.limit)
    session = LabelSession(comps, out)
    try:
        server = make_server(session, args.host, args.port)
    except OSError as e:
        raise DataError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    port = server.server_address[1]
    state = session.state()
    if not is_loopback(args.host):
        print(f"warning: listening on {args.host}: anyone who can reach this machine can label", file=sys.stderr)
    shown_host = "localhost" if is_loopback(args.host) else args.host
    print(f"labelling {state['total']} comparisons ({state['labelled']} already in {out}) "
          f"at http://{shown_host}:{port}/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def summary_main(args) -> int:
    if not Path(args.file).exists() and not ties_path(args.file).exists():
        raise DataError(f"{args.file}: file not found")
    stats = win_rates(read_labels(args.file))
    print(json.dumps(stats, indent=2) if args.json else format_summary(args.file, stats))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("label", help="human A/B labelling page; turns choices into preference data")
    lsub = p.add_subparsers(dest="label_command", required=True, metavar="{serve,summary}")
    s = lsub.add_parser("serve", help="serve the A/B page on this machine")
    src = s.add_argument_group("what to compare (pick one)")
    src.add_argument("--run", help="a run folder: its compare stage's saved generations (RUN/compare/generations/*.jsonl)")
    src.add_argument("--generations", nargs="+", metavar="FILE",
                     help="JSONL of {prompt_id, prompt, response, model?}; model defaults to the file name")
    src.add_argument("--config", help="a run config: generate now with --models on its compare.prompts")
    s.add_argument("--models", help="comma-separated models: a subset to compare, or with --config the models "
                                    "to generate with (baseline, sft, ppo, or model paths)")
    s.add_argument("--out", help="labels JSONL, appended to (default: RUN/label/labels.jsonl)")
    s.add_argument("--seed", type=int, default=0, help="fixes the comparison order and the sides")
    s.add_argument("--limit", type=int, help="label at most this many comparisons")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    s.set_defaults(handler=serve_main)
    m = lsub.add_parser("summary", help="each model's human win rate with a Wilson 95%% CI")
    m.add_argument("file", help="labels JSONL written by `rlhf label serve` (its .ties file is read too)")
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    m.set_defaults(handler=summary_main)


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.label ...`, the same as `rlhf label ...`, with one-line errors."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.label")
    add_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(["label", *(sys.argv[1:] if argv is None else argv)])
    try:
        code = args.handler(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
