"""Shared plumbing for the benchmarks: side-by-side worker processes, peak RSS, step timing,
FLOP accounting and the RESULTS.md writer.

Import-time dependencies are the standard library only: the PPO peer worker imports this module
inside the trl-1.12 venv, which has neither our packages nor pydantic. torch is imported lazily.

How a benchmark runs: the parent process prepares the data and a job description (JSON), then
starts one worker subprocess per side (ours, then the peer), one after the other. Each worker
writes a result JSON (per-step timestamps, wall time, extras) and its own peak RSS (VmHWM), so the
two sides never share an address space or pollute each other's peak.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "RESULTS.md"
PEER_VENV = BENCH_DIR / ".venv-trl112"
MAIN_PYTHON = sys.executable


# ---- the machine ----

def machine_info(device: str = "cpu", threads: int | None = None) -> dict:
    """CPU model, cores, RAM, torch version, load average, date: the header of every section."""
    info = {"date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "python": platform.python_version()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        info["cpu"] = m.group(1).strip() if m else platform.processor()
    except FileNotFoundError:
        info["cpu"] = platform.processor() or "unknown"
    info["cores"] = os.cpu_count()
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        info["ram_gb"] = round(kb / 1024 ** 2, 1)
    except (OSError, AttributeError):
        info["ram_gb"] = None
    info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    import torch
    import transformers

    info["torch"] = torch.__version__
    info["transformers"] = transformers.__version__
    info["threads"] = threads or torch.get_num_threads()  # what the workers run with
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line(info: dict) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    return (f"{info['date']} · {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM{gpu} · "
            f"torch {info['torch']}, transformers {info['transformers']}, {info['threads']} torch "
            f"thread{'s' if info['threads'] != 1 else ''} per process · "
            f"load average {info['load_avg_1m']} at start")


# ---- worker processes ----

def run_worker(argv: list[str], job: dict, *, python: str | None = None, env: dict | None = None,
               log_path: Path | None = None, timeout_s: float = 1800) -> dict:
    """Run `python argv... --job J --out O` in its own process; return its result plus peak RSS.

    The result JSON is whatever the worker wrote; we add `peak_rss_mb` (the worker's own VmHWM, see
    own_peak_rss_mb; os.wait4's ru_maxrss as a fallback), `proc_wall_s`, and the 1-minute load
    average before and after, so a noisy run is visible in the table.
    """
    with tempfile.TemporaryDirectory(prefix="bench-job-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        cmd = [python or MAIN_PYTHON, *argv, "--job", str(job_path), "--out", str(out_path)]
        # The repo first; a PYTHONPATH the caller set (packages installed with --target) is kept.
        pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        full_env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        log = open(log_path, "w") if log_path else subprocess.DEVNULL
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT)
        deadline = t0 + timeout_s
        while True:  # wait4 gives this child's own rusage (RUSAGE_CHILDREN would mix both sides)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        if log_path:
            log.close()
        if proc.returncode != 0 or not out_path.exists():
            tail = Path(log_path).read_text()[-3000:] if log_path else ""
            raise RuntimeError(f"worker {' '.join(argv)} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
        result = json.loads(out_path.read_text())
    # The worker's own high-water mark when it reports one (see own_peak_rss_mb), else wait4's.
    result.update(peak_rss_mb=result.get("own_peak_rss_mb", usage.ru_maxrss / 1024),
                  wait4_maxrss_mb=usage.ru_maxrss / 1024, proc_wall_s=wall,
                  load_before=round(load_before, 2), load_after=round(os.getloadavg()[0], 2))
    return result


def worker_args(argv: list[str] | None = None):
    """Parse the `--job J --out O` pair every worker gets; return (job dict, output path)."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--job", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--worker", required=True)
    a = ap.parse_args(argv)
    return a.worker, json.loads(Path(a.job).read_text()), Path(a.out)


# The spike guard stays on (its snapshots are part of our per-step cost) but may not roll back
# during a benchmark: a rollback skips batches, and the two sides would no longer do equal work.
# (PPO on a random-head reward model can show a large policy ratio within a few iterations.)
BENCH_GUARD = {"spike_factor": 1e9, "max_kl": 1e9, "max_ratio": 1e9}


def run_config(job: dict, sections: dict):
    """Our RunConfig for a bench job: the bench settings, then the user's `--ours-set a.b=value`
    overrides (e.g. guard.enabled=false, ppo.lora.enabled=true), validated like any config."""
    import yaml

    from stages.core.config_schema import RunConfig

    data = {"name": "bench", "model": job["model"], "seed": 0, "precision": job["dtype"],
            "guard": dict(BENCH_GUARD), **sections}
    for item in job.get("ours_set") or []:
        key, _, value = item.partition("=")
        node, *path = key.split(".")
        target = data
        for part in [node, *path][:-1]:
            target = target.setdefault(part, {})
        target[([node, *path])[-1]] = yaml.safe_load(value)
    return RunConfig.model_validate(data)


def own_peak_rss_mb() -> float:
    """This process's peak resident set since its exec (VmHWM of its own address space).

    Not getrusage: a child's ru_maxrss also carries the RSS its parent had when it forked (Linux
    saves the pre-exec high-water mark), which would put the parent's torch into both sides.
    """
    try:
        m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(m.group(1)) / 1024
    except (OSError, AttributeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_main(workers: dict) -> None:
    """Entry of a worker process: run workers[side](job), add its own peak RSS, write the result."""
    side, job, out = worker_args()
    result = workers[side](job)
    result["own_peak_rss_mb"] = own_peak_rss_mb()
    write_json(out, result)


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def set_threads(job: dict) -> None:
    """Both sides run with the same intra-op thread count (default: all cores)."""
    import torch

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))


# ---- timing ----

def clock() -> list[float]:
    """[wall seconds, this process's CPU seconds]: every step-end stamp records both.

    On a shared machine the wall time of a step depends on what else runs; the CPU time of a
    single-threaded worker hardly does (it is not charged while descheduled), so with one torch
    thread per side the CPU-time ratio is the load-robust one.
    """
    return [time.time(), time.process_time()]


def step_stats(stamps: list, warmup: int) -> dict:
    """Per-step times from end-of-step stamps (clock() pairs, or bare wall times); the first
    `warmup` steps are dropped.

    stamps[i] is when step i+1 ended, so step k's time is stamps[k-1] - stamps[k-2]; step 1 has
    no start stamp and always counts as warm-up.
    """
    warmup = max(1, warmup)
    pairs = [s if isinstance(s, (list, tuple)) else [s, None] for s in stamps]
    wall = [b[0] - a[0] for a, b in zip(pairs, pairs[1:])][warmup - 1:]
    if not wall:
        raise ValueError(f"need more than {warmup} steps to time (got {len(stamps)})")
    out = {"step_s": statistics.median(wall), "step_s_mean": statistics.fmean(wall),
           "step_s_min": min(wall), "step_s_max": max(wall), "timed_steps": len(wall), "cpu_step_s": None}
    if all(p[1] is not None for p in pairs):
        out["cpu_step_s"] = statistics.median([b[1] - a[1] for a, b in zip(pairs, pairs[1:])][warmup - 1:])
    return out


def hook_metrics_logger(key: str, on_row=None) -> list:
    """Stamp our stages' step ends: patch MetricsLogger.log so the first row of each step that
    carries `key` records clock() (and calls on_row(metrics)). Returns the list it fills."""
    from stages.core.metrics_log import MetricsLogger

    stamps, seen, orig = [], set(), MetricsLogger.log

    def log(self, step, **metrics):
        if key in metrics and step not in seen:
            seen.add(step)
            stamps.append(clock())
            if on_row is not None:
                on_row(metrics)
        return orig(self, step, **metrics)

    MetricsLogger.log = log
    return stamps


# ---- compute ceiling ----

def matmul_gflops(threads: int | None = None, n: int = 2048, reps: int = 5, device: str = "cpu",
                  dtype: str = "fp32") -> dict:
    """Measured matmul throughput (GFLOP/s) of large square matrices: the ceiling for MFU.

    Best of `reps` timed products (the best is the least disturbed by other load on the machine)
    plus the median. 2*n^3 FLOPs per product.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    a = torch.randn(n, n, device=device, dtype=tdtype)
    b = torch.randn(n, n, device=device, dtype=tdtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    inner = 1 if device == "cpu" else 50
    torch.matmul(a, b)
    sync()
    times, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(inner):
            torch.matmul(a, b)
        sync()
        times.append((time.perf_counter() - t0) / inner)
        cpu.append((time.process_time() - c0) / inner)
    flops = 2 * n ** 3
    # gflops_cpu: per CPU-second, all threads' CPU time summed (the ceiling for CPU-time MFU; CPU only)
    return {"n": n, "dtype": dtype, "device": device, "threads": torch.get_num_threads(),
            "gflops_best": flops / min(times) / 1e9, "gflops_median": flops / statistics.median(times) / 1e9,
            "gflops_cpu": flops / min(cpu) / 1e9 if device == "cpu" else None}


def ceiling(device: str = "cpu", dtype: str = "fp32", threads: int | None = None, reps: int = 10) -> dict:
    """The MFU denominator: matmul GFLOP/s measured now, raised to the best ever seen on this machine.

    A single measurement on a shared machine is often low (other jobs, a lower clock while every
    core is busy), which would inflate MFU; the best observed is the closer estimate of what the
    hardware can do. Kept in <rlhf cache>/bench/ceiling.json, keyed by CPU/GPU, dtype and threads.
    """
    now = matmul_gflops(threads=threads, device=device, dtype=dtype, reps=reps)
    try:
        from stages.modeling.loading import cache_root

        path = cache_root() / "bench" / "ceiling.json"
    except ImportError:
        return now
    info = machine_info(device, threads)
    key = f"{info.get('gpu') or info['cpu']}|{device}|{dtype}|{now['threads']}"
    seen = json.loads(path.read_text()) if path.exists() else {}
    best = seen.get(key, {})
    out = dict(now, measured_now=dict(now))
    for k in ("gflops_best", "gflops_cpu"):
        if now.get(k) is not None and (best.get(k) or 0) > now[k]:
            out[k] = best[k]
    seen[key] = {k: out[k] for k in ("gflops_best", "gflops_cpu")}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, seen)
    return out


def count_params(model_path: str, head: str = "lm") -> int:
    """Parameters that do matmul work per token (N in 6·N / 2·N).

    head="lm": the causal LM; a tied embedding is counted once, since that matrix is the LM head's
    matmul. head="score": the same backbone as a 1-label classifier: no LM head, and the input
    embedding is a lookup, not a matmul, so it is left out.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())
    if head == "lm":
        return total
    emb = model.get_input_embeddings().weight.numel()
    out = model.get_output_embeddings().weight
    untied = out is not model.get_input_embeddings().weight
    return total - emb - (out.numel() if untied else 0) + cfg.hidden_size  # + the 1-output score head


def mfu(flops_per_s: float, peak_gflops: float) -> float:
    return flops_per_s / (peak_gflops * 1e9)


# ---- reporting ----

def fmt(x, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.{digits}f}"
    return str(x)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


SECTION_ORDER = ["ceiling", "generate", "sft", "reward", "ppo"]


def update_results(section: str, title: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or add) one script's section of RESULTS.md, keeping the others; written atomically."""
    begin, end = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    text = path.read_text() if path.exists() else (
        "# Benchmark results\n\nWritten by the scripts in `bench/` (`bench/run_all.sh` runs them all); "
        "each section is replaced when its script runs again. Ratios are ours ÷ peer, measured in the same run.\n")
    block = f"{begin}\n## {title}\n\n{body.strip()}\n{end}"
    sections = dict(re.findall(r"<!-- bench:(\w+) -->\n(.*?)\n<!-- /bench:\1 -->", text, re.S))
    sections[section] = block[len(begin) + 1:-len(end) - 1]
    head = re.split(r"<!-- bench:\w+ -->", text, maxsplit=1)[0].rstrip() + "\n"
    # the fixed order, each variant section right after its base section
    order = sorted(sections, key=lambda s: (SECTION_ORDER.index(s.split("__")[0]) if s.split("__")[0] in SECTION_ORDER
                                            else len(SECTION_ORDER), s))
    out = head + "".join(f"\n<!-- bench:{s} -->\n{sections[s]}\n<!-- /bench:{s} -->\n" for s in order)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(out)
    os.replace(tmp, path)


# ---- command line shared by the scripts ----

def add_common_args(ap) -> None:
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model alias or folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="fp32, or bf16 autocast (mixed precision) for the GPU variant")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: all cores)")
    ap.add_argument("--no-write", action="store_true", help="print the table only; leave RESULTS.md alone")
    ap.add_argument("--log-dir", default=None, help="keep each worker's log here (default: a temp folder)")
    ap.add_argument("--basis", choices=["wall", "cpu"], default=None,
                    help="throughput per wall second or per CPU second (default: cpu with --threads 1 on CPU, "
                         "where other load on a shared machine would skew wall time; wall otherwise)")
    ap.add_argument("--reuse", action="append", default=[], metavar="SIDE=RESULT.json",
                    help="take a side's result from an earlier run's log folder instead of running it "
                         "(the table then says so: the ratio is no longer from one run)")
    ap.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override our stage's config, e.g. guard.enabled=false or ppo.lora.enabled=true (repeatable)")


def device_env(device: str, dtype: str, threads: int | None = None) -> dict:
    """Environment for a worker: hide the GPU on a CPU run, tell accelerate the precision, and pin
    the thread count before torch starts (so every library in the worker sees the same one)."""
    env = {"ACCELERATE_MIXED_PRECISION": "bf16" if dtype == "bf16" else "no"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_sides(sides: list[str], reuse: list[str], logs: Path, launch) -> tuple[dict, str]:
    """Run each side (launch(side) -> result) or load it from --reuse; save every result as
    logs/<side>.json. Returns (results, a note naming the reused sides, or '')."""
    reused = dict(item.split("=", 1) for item in reuse)
    res, notes, run_at = {}, [], _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    for side in sides:
        if side in reused:
            res[side] = json.loads(Path(reused[side]).read_text())
            notes.append(f"the {side} row is reused from `{reused[side]}` (measured at "
                         f"{res[side].get('measured_at', '?')}), not measured in this run")
        else:
            print(f"running {side} ...", flush=True)
            res[side] = launch(side)
            res[side].update(measured_at=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"), run_at=run_at)
        (logs / f"{side}.json").write_text(json.dumps(res[side]))
    when = {r.get("run_at") for r in res.values()}
    if len(notes) == len(res) > 1 and len(when) == 1 and None not in when:  # one earlier run: still side by side
        return res, f"Both rows are from one earlier run (started {when.pop()}), re-rendered.\n\n"
    return res, ("**Note:** " + "; ".join(notes) + ".\n\n") if notes else ""


def variant(labels: dict, section: str, args) -> tuple[dict, str]:
    """Labels and RESULTS.md section of a run: a GPU/bf16 run or one with `--ours-set` overrides
    gets its own section, so it never replaces the CPU equal-settings comparison."""
    if (args.device, args.dtype) != ("cpu", "fp32"):
        section += f"__{args.device}_{args.dtype}"
    sides = getattr(args, "sides", "ours,peer").split(",")
    if sorted(sides) != ["ours", "peer"]:
        section += "__" + "_".join(sides) + "_only"
    if not args.ours_set:
        return labels, section
    return ({**labels, "ours": f"{labels['ours']} ({', '.join(args.ours_set)})"},
            section + "__" + re.sub(r"\W+", "_", "_".join(args.ours_set)).strip("_"))


def log_dir(arg: str | None, name: str) -> Path:
    d = Path(arg) if arg else Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def side_by_side(res: dict, labels: dict, *, warmup: int, samples_per_step: int, tokens_per_sample: float,
                 flops_per_token: float, ceiling: dict, basis: str = "wall", unit: str = "samples") -> tuple[str, dict]:
    """The ours-vs-peer table from two workers' results; returns (markdown, per-side numbers).

    flops_per_token: model FLOPs per token (6·N training, 2·N inference, or a stage's own sum).
    basis: "wall" (throughput per wall second; MFU against the wall-clock matmul ceiling) or "cpu"
    (per CPU second of a single-threaded worker, against the matmul's per-CPU-second ceiling):
    the load-robust choice on a shared CPU machine, see clock().
    """
    rows, per_side = [], {}
    peak = ceiling["gflops_cpu"] if basis == "cpu" else ceiling["gflops_best"]
    for side, label in labels.items():
        if side not in res:
            continue
        r = res[side]
        st = step_stats(r["stamps"], warmup)
        per_step = st["cpu_step_s"] if basis == "cpu" else st["step_s"]
        samples_s = samples_per_step / per_step
        tokens_s = samples_s * tokens_per_sample
        m = mfu(flops_per_token * tokens_s, peak)
        per_side[side] = {"step_s": st["step_s"], "cpu_step_s": st["cpu_step_s"], "samples_s": samples_s,
                          "tokens_s": tokens_s, "mfu": m, "peak_rss_mb": r["peak_rss_mb"], "wall_s": r["wall_s"]}
        rows.append([label, st["step_s"], f"{st['step_s_min']:.2f}–{st['step_s_max']:.2f}", st["cpu_step_s"],
                     samples_s, tokens_s, f"{100 * m:.1f}%", r["peak_rss_mb"], r["wall_s"],
                     f"{r['load_before']} / {r['load_after']}"])
    if len(per_side) == 2:
        o, p = (per_side[s] for s in labels)
        rows.append(["**ratio ours ÷ peer**", ratio(o["step_s"], p["step_s"]), "", ratio(o["cpu_step_s"], p["cpu_step_s"])]
                    + [ratio(o[k], p[k]) for k in ("samples_s", "tokens_s", "mfu", "peak_rss_mb", "wall_s")] + [""])
    per = "CPU-s" if basis == "cpu" else "s"
    header = ["side", "wall s / step (median)", "min–max", "CPU s / step (median)", f"{unit} / {per}",
              f"tokens / {per}", "MFU", "peak RSS (MB)", "wall s (whole process)", "load avg before / after"]
    return markdown_table(header, rows), per_side


def basis_of(args) -> str:
    """CPU-time throughput for single-threaded CPU runs (shared machines), wall time otherwise."""
    if args.basis:
        return args.basis
    return "cpu" if args.device == "cpu" and args.threads == 1 else "wall"


def basis_note(basis: str, ceiling: dict) -> str:
    if basis == "cpu":
        return (f"Throughput and MFU are per CPU-second of the single-threaded worker (process CPU time between "
                f"step ends), against the matmul's per-CPU-second ceiling ({ceiling['gflops_cpu']:.0f} GFLOP/s, "
                f"1 thread, best seen here): on this shared machine other jobs stretch wall time but hardly CPU time, so the "
                f"CPU-time ratio is the one to read; wall times are shown as measured.")
    return (f"Throughput is per wall-clock second; MFU against the matmul ceiling "
            f"({ceiling['gflops_best']:.0f} GFLOP/s, the best seen on this machine).")


# ---- the side-by-side scripts' shared skeleton (bench_sft, bench_reward, bench_ppo) ----

def add_step_args(ap, *, lr: float, data: str, batch_help: str = "samples per step") -> None:
    """Arguments of the trainer benchmarks (SFT, RM): timed/untimed steps, batch shape, sides, data."""
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    ap.add_argument("--batch-size", type=int, default=8, help=batch_help)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--sides", default="ours,peer", help="comma list: ours, peer")
    ap.add_argument("--data", default=data, help="the source to draw from (cycled to fill the steps)")


class Setup:
    """What a side-by-side script works out before it runs its sides: row labels and RESULTS.md
    section of this variant, throughput basis, log folder, machine line, matmul ceiling, model folder."""

    def __init__(self, args, labels: dict, section: str):
        from stages.modeling.loading import resolve_model

        self.args = args
        self.labels, self.section = variant(labels, section, args)
        self.basis = basis_of(args)
        self.logs = log_dir(args.log_dir, section)
        self.info = machine_info(args.device, args.threads)
        self.ceiling = ceiling(args.device, args.dtype, args.threads)
        self.model_path = resolve_model(args.model)

    def run_sides(self, module: str, job: dict, peer_python: str | None = None) -> tuple[dict, str]:
        """Each side of `python -m module --worker SIDE` in its own process (the peer under
        peer_python when given), or reused from --reuse."""
        args = self.args
        env = device_env(args.device, args.dtype, args.threads)
        return run_sides(args.sides.split(","), args.reuse, self.logs, lambda side: run_worker(
            ["-m", module, "--worker", side], job, python=peer_python if side == "peer" else None, env=env,
            log_path=self.logs / f"{side}.log"))

    def publish(self, res: dict, title: str, body: str) -> None:
        """Write the section unless --no-write; a one-sided run is written too, without ratios."""
        args = self.args
        if not args.no_write and "ours" in res:
            suffix = f", ours with {', '.join(args.ours_set)}" if args.ours_set else ""
            update_results(self.section, f"{title} ({args.device}, {args.dtype}){suffix}", body)


def time_stage(run_fn, job: dict, sections: dict, stamp_key: str, *, on_row=None, prefix: str = "bench-",
               prepare=None) -> dict:
    """Our side of a benchmark: `run_fn(cfg, fresh run folder)` with the bench config, step end
    times taken from the stage's metrics rows that carry `stamp_key`; prepare(run_dir) first, if given."""
    set_threads(job)
    run_dir = Path(tempfile.mkdtemp(prefix=prefix))
    if prepare is not None:
        prepare(run_dir)
    cfg = run_config(job, sections)
    stamps = hook_metrics_logger(stamp_key, on_row)
    t0 = time.perf_counter()
    try:
        summary = run_fn(cfg, run_dir)
    finally:  # a stage's run folder holds GBs of checkpoints and models; the numbers are in the stamps
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"stamps": stamps, "wall_s": time.perf_counter() - t0, "summary": summary}


def trl_stamper():
    """(callback, stamps) for a TRL trainer: the callback records clock() at every step end."""
    from transformers import TrainerCallback

    stamps: list = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(clock())

    return Stamp(), stamps


def trl_training_args(job: dict, warmup_ratio: float, prefix: str) -> dict:
    """The TrainingArguments both TRL peers share, equal to our side's settings: batch, steps, cosine
    LR with warm-up, grad clip 1.0, no weight decay, no checkpointing or eval, no reporting."""
    return dict(
        output_dir=tempfile.mkdtemp(prefix=prefix), per_device_train_batch_size=job["batch_size"],
        gradient_accumulation_steps=1, max_steps=job["steps"], learning_rate=job["lr"], lr_scheduler_type="cosine",
        warmup_steps=round(warmup_ratio * job["steps"]), weight_decay=0.0, max_grad_norm=1.0,
        max_length=job["max_length"], gradient_checkpointing=False, bf16=job["dtype"] == "bf16", fp16=False,
        use_cpu=job["device"] == "cpu", logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        dataloader_num_workers=0, seed=0, disable_tqdm=False)
