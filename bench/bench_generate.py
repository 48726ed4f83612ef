"""Generation throughput of the rollout path: `stages.modeling.generation.generate` (batched, left-padded,
KV-cached, and on an fp32 CPU model with packed Linear weights) against the same with packing off
(`RLHF_PACKED_LINEAR=0`) and plain Hugging Face `generate`, batched and one prompt at a time.

    python -m bench.bench_generate                    # SmolLM2-135M, batch 8, 32 and 64 new tokens
    python -m bench.bench_generate --device cuda --dtype bf16

All variants run in one process on the same loaded model, one after the other, each with a
warm-up call and then `--reps` timed calls (median reported). Greedy decoding gives every variant
the same tokens (equal work); sampling at T=1 is what PPO rollouts do (lengths then differ a
little, so compare tokens/s there, not s/batch).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from bench import benchlib as bl


def _count_generated(response, pad_id: int) -> int:
    return int((response != pad_id).sum())


def variants(model, tok, texts: list[str], new_tokens: int, temperature: float):
    """name -> a callable generating for all `texts` and returning the number of generated tokens."""
    import torch

    from stages.modeling.generation import generate
    from stages.modeling.packed import ENV
    from stages.modeling.tensors import mask_after_eos

    sample = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else dict(do_sample=False)
    common = dict(max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **sample)

    def ours():
        resp = generate(model, tok, texts, max_new_tokens=new_tokens, temperature=temperature, top_p=1.0).response
        return _count_generated(resp, tok.pad_token_id)

    def ours_unpacked():
        before, os.environ[ENV] = os.environ.get(ENV), "0"
        try:
            return ours()
        finally:
            os.environ.pop(ENV) if before is None else os.environ.__setitem__(ENV, before)

    def hf_batched():
        tok.padding_side = "left"
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            out = model.generate(**enc, **common)
        resp = mask_after_eos(out[:, enc["input_ids"].shape[1]:], tok.eos_token_id, tok.pad_token_id)
        return _count_generated(resp, tok.pad_token_id)

    def hf_per_sample():
        n = 0
        for t in texts:
            enc = tok([t], return_tensors="pt", add_special_tokens=False).to(model.device)
            with torch.no_grad():
                out = model.generate(**enc, **common)
            n += out.shape[1] - enc["input_ids"].shape[1]
        return n

    return {"ours: stages.modeling.generation.generate (batched)": ours,
            f"ours with {ENV}=0 (no packed weights)": ours_unpacked, "HF generate, batched": hf_batched,
            "HF generate, one prompt at a time": hf_per_sample}


def time_variant(fn, reps: int, sync) -> dict:
    import torch

    torch.manual_seed(0)
    fn()  # warm-up (allocator, kernels)
    times, cpu, tokens = [], [], []
    for i in range(reps):
        torch.manual_seed(i)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        tokens.append(fn())
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"s": statistics.median(times), "cpu_s": statistics.median(cpu), "tokens": statistics.fmean(tokens),
            "tok_s": sum(tokens) / sum(times), "tok_cpu_s": sum(tokens) / sum(cpu)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bl.add_common_args(ap)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", nargs="+", choices=["greedy", "sample"], default=["greedy", "sample"])
    args = ap.parse_args(argv)

    import torch

    from bench import benchdata
    from stages.modeling.loading import load_causal_lm, load_tokenizer, resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    info = bl.machine_info(args.device, args.threads)
    ceiling = bl.ceiling(args.device, args.dtype, args.threads)
    tok = load_tokenizer(args.model)
    model = load_causal_lm(args.model, args.dtype).to(args.device).eval()
    n_params = bl.count_params(resolve_model(args.model))
    import tempfile
    from pathlib import Path

    data = benchdata.prompts(Path(tempfile.mkdtemp(prefix="bench-gen-")), args.batch_size, tok)
    texts, p_len = data["texts"], data["prompt_tokens"]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    basis = bl.basis_of(args)
    per, rate = ("CPU-s", "tok_cpu_s") if basis == "cpu" else ("s", "tok_s")
    peak = ceiling["gflops_cpu"] if basis == "cpu" else ceiling["gflops_best"]
    rows, results = [], {}
    for mode, temperature in [m for m in (("greedy", 0.0), ("sample T=1", 1.0)) if m[0].split()[0] in args.modes]:
        for r_len in args.new_tokens:
            base = None
            for name, fn in variants(model, tok, texts, r_len, temperature).items():
                res = time_variant(fn, args.reps, sync)
                flops = 2 * n_params * (args.batch_size * p_len + res["tokens"])  # prefill + decode
                res["mfu"] = bl.mfu(flops * res[rate] / res["tokens"], peak)
                base = base or res
                results[(mode, r_len, name)] = res
                rows.append([mode, r_len, name, res["s"], res["cpu_s"], res["tokens"], res[rate],
                             f"{100 * res['mfu']:.1f}%", base[rate] / res[rate] if res is not base else "–"])
                print(rows[-1], flush=True)
    header = ["decoding", "new tokens", "variant", "wall s / batch", "CPU s / batch", "tokens generated",
              f"tokens / {per}", "MFU", "ours ÷ this (tokens/s)"]
    table = bl.markdown_table(header, rows)
    print(table)
    body = (f"{bl.machine_line(info)}\n\nSmolLM2-135M ({n_params / 1e6:.1f} M parameters), {args.dtype}, batch of "
            f"{args.batch_size} default prompts (mean {p_len:.0f} prompt tokens), median of {args.reps} timed calls "
            f"after a warm-up. tokens generated counts real tokens up to and including EOS. MFU = 2·N·(prompt + "
            f"generated tokens)/s ÷ ceiling. {bl.basis_note(basis, ceiling)}\n\n{table}\n")
    if not args.no_write:
        section = "generate" if (args.device, args.dtype) == ("cpu", "fp32") else f"generate__{args.device}_{args.dtype}"
        bl.update_results(section, f"Generation: rollout path vs HF generate ({args.device}, {args.dtype})", body)
    return {str(k): v for k, v in results.items()}


if __name__ == "__main__":
    main()
