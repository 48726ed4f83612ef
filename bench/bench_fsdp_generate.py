"""Generation on FSDP2-sharded weights: every decoding step all-gathering the layers again (what a
plain `generate` on a sharded model does) against PPO's `gathered_for_generation`, which gathers
them once per rollout. Launch with 2 CPU processes over gloo (or GPUs):

    accelerate launch --config_file configs/accelerate/cpu_fsdp2.yaml -m bench.bench_fsdp_generate \\
        [--model smollm2-135m-instruct] [--batch 8] [--new-tokens 32] [--repeats 3]

Both sides run in one process pair, alternating, greedy (the same tokens). Prints one JSON line
(rank 0): median wall seconds per generate call for each side, and their ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    from stages.core.runtime import make_accelerator, resolve_precision
    from stages.core.sharding import backend_name, gathered_for_generation
    from stages.modeling.generation import generate
    from stages.modeling.loading import DEFAULT_MODEL, load_causal_lm, load_tokenizer
    from stages.training.optimizer import adamw

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()

    class Cfg:
        precision = resolve_precision(args.precision)

    acc = make_accelerator(Cfg)
    tok = load_tokenizer(args.model)
    model = load_causal_lm(args.model, "fp32")
    model, _ = acc.prepare(model, adamw(model.parameters(), 1e-6))  # prepare() wants the optimizer too
    model.eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": f"Name {i + 2} colours."}], tokenize=False,
                                     add_generation_prompt=True) for i in range(args.batch)]

    def once(gathered: bool) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        with acc.autocast(), (gathered_for_generation(model) if gathered else torch.no_grad()):
            out = generate(model, tok, texts, max_new_tokens=args.new_tokens, temperature=0.0, top_p=1.0)
        return time.perf_counter() - t0, out.response

    once(True)  # warm-up
    times = {"per_step": [], "once": []}
    for _ in range(args.repeats):
        for side in ("per_step", "once"):
            dt, resp = once(side == "once")
            times[side].append(dt)
            if side == "per_step":
                ref = resp
            else:
                assert torch.equal(ref, resp), "the two sides generated different tokens"
    if acc.is_main_process:
        med = {k: statistics.median(v) for k, v in times.items()}
        print(json.dumps({"backend": backend_name(acc), "world_size": acc.num_processes, "model": args.model,
                          "precision": Cfg.precision, "threads": torch.get_num_threads(), "batch": args.batch,
                          "new_tokens": args.new_tokens, "median_s_gather_per_step": round(med["per_step"], 3),
                          "median_s_gather_once": round(med["once"], 3),
                          "speedup": round(med["per_step"] / med["once"], 2)}), flush=True)


if __name__ == "__main__":
    main()
