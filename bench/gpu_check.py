"""The cluster path on one GPU: SFT, RM and PPO through `rlhf run`, under each accelerate backend the
configs in configs/accelerate/ name, on the tiny model and on a SmolLM2-135M-sized model.

    python -m bench.gpu_check --out DIR --smollm2-dir D  # everything, 10 runs at once on one GPU
    python -m bench.gpu_check --out DIR --backends fsdp2 --models tiny

Backends, each with ONE process (a single GPU can host no more), taken from the repo's own accelerate
files with num_processes set to 1, so the files a cluster user launches are the ones checked:

    single  configs/accelerate/single_gpu.yaml
    ddp     configs/accelerate/ddp_8gpu.yaml
    fsdp2   configs/accelerate/fsdp_8gpu.yaml         (run on 2 CPU processes; not yet on a GPU)
    zero2   bench/accelerate_pending/zero2_8gpu.yaml   (not supported yet: rlhf rejects it at pre-flight,
    zero3   bench/accelerate_pending/zero3_8gpu.yaml   so these rows show that one-line error unless
                                                       RLHF_ALLOW_PENDING_BACKENDS=1, which lets them run)

Models: `tiny` (tiny-random-llama, from the model cache) and `smollm2-arch`: SmolLM2-135M-Instruct's
architecture and tokenizer with seeded random weights, built from --smollm2-dir (a folder with its
config.json and tokenizer; weights, if present, are used as they are). A backend check needs the
shapes, not the weights, and a machine without network cannot fetch them.

Each (model, backend) is one `rlhf run configs/tiny.yaml --stages sft,reward,ppo` at bf16, the runs in
parallel (--parallel). Per run it records each stage's status, wall time and one-line error, and
whether the SFT and RM models load in plain transformers. Writes gpu_check.jsonl and gpu_check.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PENDING = Path("bench") / "accelerate_pending"  # backends the stages do not support yet (rejected at pre-flight)
BACKENDS = {"single": Path("configs/accelerate/single_gpu.yaml"), "ddp": Path("configs/accelerate/ddp_8gpu.yaml"),
            "fsdp2": Path("configs/accelerate/fsdp_8gpu.yaml"), "zero2": PENDING / "zero2_8gpu.yaml", "zero3": PENDING / "zero3_8gpu.yaml"}
STAGES = ("sft", "reward", "ppo")
# Short runs: every stage trains, checkpoints and exports; PPO does 2 iterations of 8 rollouts.
OVERRIDES = ["precision=bf16", "sft.max_steps=4", "sft.save_steps=2", "reward.max_steps=4", "reward.save_steps=2",
             "ppo.iterations=2", "ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.max_new_tokens=16"]


def one_process_config(backend: str, folder: Path) -> Path:
    raw = yaml.safe_load((REPO / BACKENDS[backend]).read_text())
    raw.update(num_processes=1, num_machines=1)
    path = folder / f"accelerate-{backend}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def smollm2_arch(src: Path, dst: Path) -> Path:
    """SmolLM2-135M's config and tokenizer with seeded random weights (unless src has weights)."""
    if (src / "model.safetensors").exists():
        return src
    if (dst / "model.safetensors").exists():
        return dst
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.copytree(src, dst, dirs_exist_ok=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    model.save_pretrained(dst, safe_serialization=True)
    return dst


def loads_in_transformers(folder: Path, kind: str) -> str:
    """'ok' if a plain transformers load of the exported model works, else the error's first line."""
    code = ("import sys, transformers as t; "
            f"c = t.AutoModelForCausalLM if {kind!r} == 'lm' else t.AutoModelForSequenceClassification; "
            "c.from_pretrained(sys.argv[1])")
    p = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True)
    return "ok" if p.returncode == 0 else (p.stderr.strip().splitlines() or ["failed"])[-1][:200]


def run_one(model: str, model_path: str, backend: str, port: int, out: Path, timeout: int) -> dict:
    work = out / f"{model}-{backend}"
    work.mkdir(parents=True, exist_ok=True)
    acc = one_process_config(backend, work)
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "configs/tiny.yaml", "--stages", ",".join(STAGES),
           f"runs_root={work / 'runs'}", f"model={model_path}", f"name={model}-{backend}",
           f"launch.accelerate_config={acc}", "launch.num_processes=1", f"launch.main_process_port={port}",
           *OVERRIDES]
    # One process, but FSDP and DeepSpeed still form a process group: give each parallel run its own port.
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    with open(work / "log.txt", "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    row = {"model": model, "backend": backend, "rc": rc, "wall_s": round(time.time() - t0, 1), "stages": {}}
    run_dir = work / "runs" / f"{model}-{backend}"
    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").exists() else {}
    for s in STAGES:
        m = manifest.get("stages", {}).get(s, {})
        row["stages"][s] = {"status": m.get("status", "not reached"), "wall_s": m.get("wall_s"),
                            "error": m.get("error"),
                            **{k: v for k, v in (m.get("metrics") or {}).items()
                               if k in ("steps", "final_loss", "eval_accuracy", "reward_mean", "kl", "world_size",
                                        "precision", "iterations")}}
    for s, kind in (("sft", "lm"), ("reward", "cls"), ("ppo", "lm")):
        if row["stages"][s]["status"] == "done":
            row["stages"][s]["plain_transformers_load"] = loads_in_transformers(run_dir / s / "model", kind)
    if rc != 0:
        text = (work / "log.txt").read_text()
        row["log_tail"] = text[-1500:]
        errors = [line for line in text.splitlines() if line.startswith(("config error:", "error:"))]
        row["error"] = errors[0][:300] if errors else None
    return row


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"Device: {device}. One process per run, bf16, `rlhf run configs/tiny.yaml` with "
             f"`{' '.join(OVERRIDES)}`.", "",
             "| model | backend | " + " | ".join(STAGES) + " | wall s |", "|---|---|" + "---|" * len(STAGES) + "---|"]
    for r in rows:
        cells = []
        for s in STAGES:
            st = r["stages"][s]
            cell = st["status"] + (f" {st['wall_s']:.0f}s" if st.get("wall_s") else "")
            if st.get("plain_transformers_load") not in (None, "ok"):
                cell += " (plain load failed)"
            if st.get("error"):
                cell += f": {st['error'][:120]}"
            cells.append(cell)
        if r.get("error") and all(r["stages"][s]["status"] == "not reached" for s in STAGES):
            cells = [f"refused: {r['error'][:160]}"] + [""] * (len(STAGES) - 1)
        lines.append(f"| {r['model']} | {r['backend']} | " + " | ".join(cells) + f" | {r['wall_s']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the runs, gpu_check.jsonl and gpu_check.md")
    ap.add_argument("--models", default="tiny,smollm2-arch")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--smollm2-dir", default=None, help="SmolLM2-135M config + tokenizer folder (for smollm2-arch)")
    ap.add_argument("--parallel", type=int, default=10, help="runs at once on the one GPU")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per run")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("error: gpu_check needs a CUDA GPU", file=sys.stderr)
        return 2
    device = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths = {"tiny": "tiny-random-llama"}
    if "smollm2-arch" in args.models:
        if not args.smollm2_dir:
            print("error: --smollm2-dir is needed for the smollm2-arch model", file=sys.stderr)
            return 2
        paths["smollm2-arch"] = str(smollm2_arch(Path(args.smollm2_dir), out / "smollm2-arch-model"))
        (out / "smollm2_path.txt").write_text(paths["smollm2-arch"])  # for bench/gpu_check.sh
    jobs = [(m, paths[m], b) for m in args.models.split(",") for b in args.backends.split(",")]
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = [pool.submit(run_one, m, p, b, 29600 + i, out, args.timeout) for i, (m, p, b) in enumerate(jobs)]
        rows = [f.result() for f in futures]
    (out / "gpu_check.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "gpu_check.md").write_text(markdown(rows, device))
    print(markdown(rows, device))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
