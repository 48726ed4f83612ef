"""The machine's physical ceiling: measured matmul GFLOP/s, the denominator of every MFU figure.

    python -m bench.bench_matmul                       # CPU fp32, 1 and all threads
    python -m bench.bench_matmul --device cuda --dtype bf16

MFU (model-FLOPs utilisation) in the other scripts is model FLOPs per second over this number:
6·N·tokens/s for training, 2·N·tokens/s for inference (N = parameters, tied embedding counted
once, attention's sequence-length term left out), the usual PaLM-style accounting.
"""
from __future__ import annotations

import argparse
import os

from bench import benchlib as bl




def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bl.add_common_args(ap)
    args = ap.parse_args(argv)
    if args.device == "cpu":
        threads = sorted({1, args.threads or os.cpu_count()})
        dtypes = [args.dtype]
    else:
        threads, dtypes = [None], sorted({"fp32", args.dtype})
    info = bl.machine_info(args.device, args.threads)
    rows = []
    for dtype in dtypes:
        for t in threads:
            r = bl.ceiling(args.device, dtype, t or None)
            now = r["measured_now"]
            rows.append([f"{r['device']} {r['dtype']}", r["threads"] if args.device == "cpu" else "–", r["n"],
                         now["gflops_best"], now["gflops_median"], now["gflops_cpu"], r["gflops_best"], r["gflops_cpu"]])
    table = bl.markdown_table(["device / dtype", "threads", "n", "GFLOP/s now (best of 10)", "now (median)",
                               "now, per CPU-second", "ceiling: best seen (wall)",
                               "ceiling: best seen (per CPU-s)"], rows)
    print(table)
    body = (f"{bl.machine_line(info)}\n\n`torch.matmul` of two n×n matrices, 2·n³ FLOPs per product. The MFU columns "
            f"of the other sections divide by the best throughput seen on this machine (every script measures it "
            f"again before its run and keeps the best in `~/.cache/rlhf/bench/ceiling.json`): one measurement on a "
            f"shared machine is often low. The per-CPU-second figure divides by process CPU time instead of wall "
            f"time, so time spent descheduled by other jobs does not count.\n\n{table}\n")
    if not args.no_write:
        bl.update_results("ceiling" if args.device == "cpu" else f"ceiling__{args.device}", f"Physical ceiling: matmul throughput ({args.device})", body)
    return {"rows": rows}


if __name__ == "__main__":
    main()
