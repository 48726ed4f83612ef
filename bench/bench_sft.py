"""SFT: our stage (stages.sft.run) against TRL's SFTTrainer, same model, data, batch and steps.

    python -m bench.bench_sft                         # CPU, fp32, batch 8, 1 warm-up + 5 timed steps
    python -m bench.bench_sft --device cuda --dtype bf16

Equal settings on both sides: assistant-only loss, batch 8, max_length 256, lr 5e-5 cosine with
5% warm-up, AdamW, grad clip 1.0, no eval, no checkpoints during the timed steps, fp32 (or bf16
autocast), no gradient checkpointing (TRL turns it on by default; we switch it off because our
stage does not use it), no packing, report_to none. Each side runs in its own subprocess.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench import benchlib as bl

WARMUP_RATIO = 0.05
SECTION = "sft"


# ---- workers (run in their own process) ----

def worker_ours(job: dict) -> dict:
    from stages import sft

    bl.set_threads(job)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-sft-ours-"))
    cfg = bl.run_config(job, {"sft": dict(
        data={"source": job["data"]}, max_steps=job["steps"], batch_size=job["batch_size"],
        max_length=job["max_length"], lr=job["lr"], lr_scheduler="cosine", warmup_ratio=WARMUP_RATIO,
        eval_fraction=0.0, save_steps=0, logging_steps=1)})
    stamps = bl.hook_metrics_logger("loss")
    t0 = time.perf_counter()
    summary = sft.run(cfg, run_dir)
    wall = time.perf_counter() - t0
    return {"stamps": stamps, "wall_s": wall, "summary": summary}


def worker_peer(job: dict) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    bl.set_threads(job)
    stamps: list = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(bl.clock())

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(job["model_path"])
    tok.padding_side = "right"
    rows = [__import__("json").loads(line) for line in Path(job["data"]).read_text().splitlines()]
    ds = datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(job["model_path"], dtype=torch.float32)
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-sft-trl-"), per_device_train_batch_size=job["batch_size"],
        gradient_accumulation_steps=1, max_steps=job["steps"], learning_rate=job["lr"], lr_scheduler_type="cosine",
        warmup_steps=round(WARMUP_RATIO * job["steps"]), weight_decay=0.0, max_grad_norm=1.0,
        max_length=job["max_length"], assistant_only_loss=True, packing=False, padding_free=False,
        gradient_checkpointing=False, bf16=job["dtype"] == "bf16", fp16=False, use_cpu=job["device"] == "cpu",
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", dataloader_num_workers=0,
        seed=0, shuffle_dataset=False, disable_tqdm=False,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Stamp()])
    trainer.train()
    return {"stamps": stamps, "wall_s": time.perf_counter() - t0}


# ---- parent ----

def run_side(side: str, job: dict, logs: Path) -> dict:
    return bl.run_worker(["-m", "bench.bench_sft", "--worker", side], job, env=bl.device_env(job["device"], job["dtype"], job["threads"]),
                         log_path=logs / f"{side}.log")


LABELS = {"ours": "ours: stages.sft", "peer": "TRL SFTTrainer (trl 1.16)"}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bl.add_common_args(ap)
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--sides", default="ours,peer", help="comma list: ours, peer")
    ap.add_argument("--data", default="default:demonstrations", help="a demonstrations source (cycled to fill the steps)")
    args = ap.parse_args(argv)

    from stages.models import load_tokenizer, resolve_model

    from bench import benchdata

    labels, section = bl.variant(LABELS, SECTION, args)
    basis = bl.basis_of(args)
    logs = bl.log_dir(args.log_dir, SECTION)
    info = bl.machine_info(args.device, args.threads)
    ceiling = bl.ceiling(args.device, args.dtype, args.threads)
    model_path = resolve_model(args.model)
    n_params = bl.count_params(model_path)
    total = args.steps + args.warmup
    data = benchdata.demonstrations(logs, args.batch_size * total, load_tokenizer(args.model), args.max_length, args.data)
    job = {"model": args.model, "model_path": model_path, "data": data["path"], "steps": total,
           "batch_size": args.batch_size, "max_length": args.max_length, "lr": args.lr, "device": args.device,
           "dtype": args.dtype, "threads": args.threads, "ours_set": args.ours_set}
    res, note = bl.run_sides(args.sides.split(","), args.reuse, logs, lambda side: run_side(side, job, logs))
    table, _ = bl.side_by_side(res, labels, warmup=args.warmup, samples_per_step=args.batch_size,
                               tokens_per_sample=data["tokens_per_sample"], flops_per_token=6 * n_params,
                               ceiling=ceiling, basis=basis)
    print(table)
    body = (f"{bl.machine_line(info)}\n\nSmolLM2-135M ({n_params / 1e6:.1f} M params), {args.dtype}, batch "
            f"{args.batch_size}, max_length {args.max_length}, assistant-only loss, {args.warmup} warm-up + "
            f"{args.steps} timed steps, default demonstrations cycled (mean {data['tokens_per_sample']:.0f} tokens "
            f"per sample). s/step = median time between consecutive step ends (wall and process CPU); tokens = "
            f"samples × mean tokens per sample; MFU = 6·N·tokens/s ÷ ceiling. {bl.basis_note(basis, ceiling)} Our "
            f"stage runs with its defaults otherwise (padding-free batches); TRL pads, as its padding-free mode "
            f"needs flash-attention. Peak RSS is each side's own process (VmHWM). Logs: `{logs}`.\n\n"
            f"{note}{table}\n")
    if not args.no_write and "ours" in res:  # a one-sided run is written too, without ratios
        bl.update_results(section, f"SFT: stages.sft vs TRL SFTTrainer ({args.device}, {args.dtype})"
                           + (f", ours with {', '.join(args.ours_set)}" if args.ours_set else ""), body)
    return res


if __name__ == "__main__":
    import sys

    if "--worker" in sys.argv:
        bl.worker_main({"ours": worker_ours, "peer": worker_peer})
    else:
        main()
