"""Is the RM's RSS growth a leak or allocator fragmentation? (issue 20, defect 8)

    .venv/bin/python bench/rm_malloc_probe.py [--steps 40] [--batch-size 4] [--freeze-layers 26]

Trains the reward model in-process with the stage's own pieces (HH-RLHF harmless-base pairs,
max_length 512, padding-free packed rows, AdamW) and every --every steps prints: RSS, the number of
live tensors the garbage collector can see (a leak of graphs or metrics holding tensors grows it),
glibc's heap statistics (mallinfo2: bytes in use vs bytes held free inside the heap); at the end,
the RSS before and after malloc_trim(0). Free heap bytes that grow while the live tensors stay flat, and RSS
that malloc_trim gives back, mean fragmentation, not a leak.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
HH = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--freeze-layers", type=int, default=26)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--trim", action="store_true", help="malloc_trim(0) after every step (the candidate fix)")
    args = ap.parse_args()

    from data_schemas.loaders import load_preferences
    from data_schemas.spec import DatasetSpec
    from stages.modeling.loading import load_reward_model, load_tokenizer
    from stages.modeling.trainable import freeze_lower_layers
    from stages.reward import collate_groups, make_loss_fn, preference_groups

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    proc = psutil.Process()
    torch.manual_seed(0)
    tok = load_tokenizer("smollm2-135m-instruct")
    tok.padding_side = "right"
    records = load_preferences(DatasetSpec(source=str(HH), format="hh"))
    groups, _ = preference_groups(tok, records, 512)
    model = load_reward_model("smollm2-135m-instruct", pad_token_id=tok.pad_token_id)
    freeze_lower_layers(model, args.freeze_layers)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    loss_fn = make_loss_fn(True)
    order = torch.randperm(len(groups)).tolist()
    gib = 1024**3
    print(f"{len(groups)} groups; threads {torch.get_num_threads()}; MALLOC env: "
          f"{ {k: v for k, v in os.environ.items() if k.startswith('MALLOC')} }", flush=True)
    print("step  tokens  RSS_GiB  live_tensors  heap_in_use_GiB  heap_free_GiB  mmapped_GiB")
    import time

    t_train = 0.0
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        idx = order[(step - 1) * args.batch_size: step * args.batch_size]
        batch = collate_groups([groups[i] for i in idx], tok.pad_token_id, padding_free=True)
        model.train()
        out = loss_fn(model, batch)
        (out.loss_sum / batch.count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del out, batch
        if args.trim:
            libc.malloc_trim(0)
        t_train += time.perf_counter() - t0
        if step % args.every == 0 or step == 1:
            gc.collect()
            rss = proc.memory_info().rss / gib
            live = sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))
            mi = libc.mallinfo2()
            tokens = sum(len(r) for i in idx for r in groups[i][0])
            print(f"{step:4d}  {tokens:6d}  {rss:7.2f}  {live:12d}  {mi.uordblks / gib:15.2f}  {mi.fordblks / gib:13.2f}  "
                  f"{mi.hblkhd / gib:11.2f}", flush=True)
    # Trimming only at the end, so it cannot change the run it measures.
    before = proc.memory_info().rss / gib
    libc.malloc_trim(0)
    print(f"end: RSS {before:.2f} GiB, after malloc_trim(0) {proc.memory_info().rss / gib:.2f} GiB; "
          f"training {t_train / args.steps:.2f} s/step (CPU {proc.cpu_times().user + proc.cpu_times().system:.0f} s in all)",
          flush=True)


if __name__ == "__main__":
    main()
