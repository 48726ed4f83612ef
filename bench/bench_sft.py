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
import time
from pathlib import Path

from bench import benchlib as bl

WARMUP_RATIO = 0.05
SECTION = "sft"


# ---- workers (run in their own process) ----

def worker_ours(job: dict) -> dict:
    from stages import sft

    return bl.time_stage(sft.run, job, {"sft": dict(
        data={"source": job["data"]}, max_steps=job["steps"], batch_size=job["batch_size"],
        max_length=job["max_length"], lr=job["lr"], lr_scheduler="cosine", warmup_ratio=WARMUP_RATIO,
        eval_fraction=0.0, save_steps=0, logging_steps=1)}, "loss", prefix="bench-sft-ours-")


def worker_peer(job: dict) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    bl.set_threads(job)
    stamp, stamps = bl.trl_stamper()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(job["model_path"])
    tok.padding_side = "right"
    rows = [__import__("json").loads(line) for line in Path(job["data"]).read_text().splitlines()]
    ds = datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(job["model_path"], dtype=torch.float32)
    args = SFTConfig(**bl.trl_training_args(job, WARMUP_RATIO, "bench-sft-trl-"), assistant_only_loss=True,
                     packing=False, padding_free=False, shuffle_dataset=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[stamp])
    trainer.train()
    return {"stamps": stamps, "wall_s": time.perf_counter() - t0}


# ---- parent ----

LABELS = {"ours": "ours: stages.sft", "peer": "TRL SFTTrainer (trl 1.16)"}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bl.add_common_args(ap)
    bl.add_step_args(ap, lr=5e-5, data="default:demonstrations")
    args = ap.parse_args(argv)

    from bench import benchdata
    from stages.modeling.loading import load_tokenizer

    b = bl.Setup(args, LABELS, SECTION)
    labels, basis, logs, info, ceiling, model_path = b.labels, b.basis, b.logs, b.info, b.ceiling, b.model_path
    n_params = bl.count_params(model_path)
    total = args.steps + args.warmup
    data = benchdata.demonstrations(logs, args.batch_size * total, load_tokenizer(args.model), args.max_length, args.data)
    job = {"model": args.model, "model_path": model_path, "data": data["path"], "steps": total,
           "batch_size": args.batch_size, "max_length": args.max_length, "lr": args.lr, "device": args.device,
           "dtype": args.dtype, "threads": args.threads, "ours_set": args.ours_set}
    res, note = b.run_sides("bench.bench_sft", job)
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
    b.publish(res, "SFT: stages.sft vs TRL SFTTrainer", body)
    return res


if __name__ == "__main__":
    import sys

    if "--worker" in sys.argv:
        bl.worker_main({"ours": worker_ours, "peer": worker_peer})
    else:
        main()
