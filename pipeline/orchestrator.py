"""Chains the stages, each in its own `accelerate launch` process, skipping what is done and unchanged.

A stage's identity is a hash of the settings it reads plus its upstream stages' hashes, so a change
to `ppo.*` re-runs ppo and what depends on it (compare), and nothing before it. What a stage reads
outside its own section is declared once, in `stages.core.config_schema.stage_inputs`; the hash
is derived from that declaration.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from data_schemas.files import atomic_write_json, atomic_write_text
from pipeline.launcher import stage_command, stage_env
from pipeline.rundir import Manifest, RunLock, clear_done, read_done, run_dir_for, write_done
from stages.core.config_schema import config_hash, stage_inputs
from stages.core.entry import interrupted_line
from stages.core.errors import StageError
from stages.core.run_folder import STAGES, stage_dir
from stages.core.runtime import resolve_precision

RUN_LEVEL_KEYS = ("model", "seed", "precision", "trust_remote_code")
ATTEMPT = ".attempt.json"
# What a stage may write into its folder; `--force` and a config change remove these and nothing else,
# so a user's own file in runs/<name>/<stage>/ survives.
STAGE_OUTPUTS = ("config.yaml", "metrics.jsonl", "summary.json", "model", "adapter", "checkpoints", "tensorboard",
                 "samples.jsonl", "generations.jsonl", "generation_settings.json", "prompt.txt", "generations",
                 "metrics.json", "report.md", "report.html", "plots", "DONE", ATTEMPT)


def upstream(cfg, stage: str) -> list[str]:
    """Stages whose outputs `stage` reads: the stages its model references name."""
    refs = stage_inputs(cfg, stage).models
    return [s for s in STAGES if s in refs and s != stage]


def _dotted(data: dict, key: str):
    for part in key.split("."):
        data = data[part]
    return data


def _file_content(path: Path) -> str:
    # errors="replace": a file that is not UTF-8 is reported by pre-flight, in one line, not here
    return path.read_bytes().decode("utf-8", errors="replace") if path.is_file() else f"(missing: {path})"


def stage_hashes(cfg) -> dict[str, str]:
    """Each stage's identity: the run-level keys, the guard, its own section, what `stage_inputs`
    declares it reads (other sections' settings, file contents), and its upstream stages' hashes."""
    dumped = cfg.model_dump(mode="json")
    run_level = {k: dumped[k] for k in RUN_LEVEL_KEYS}
    run_level["precision"] = resolve_precision(run_level["precision"])  # what the stages will run with
    hashes: dict[str, str] = {}
    for stage in STAGES:  # STAGES is in dependency order
        inputs = stage_inputs(cfg, stage)
        own = {"run": run_level, "guard": dumped["guard"], stage: dumped[stage],
               "reads": {k: _dotted(dumped, k) for k in inputs.settings},
               "files": {k: _file_content(p) for k, p in inputs.files.items()},
               "upstream": {u: hashes[u] for u in upstream(cfg, stage)}}
        hashes[stage] = config_hash(own)
    return hashes


def select_stages(stages: list[str] | None, from_stage: str | None) -> list[str]:
    chosen = list(STAGES) if not stages else stages
    for s in [*chosen, *([from_stage] if from_stage else [])]:
        if s not in STAGES:
            raise StageError(f"unknown stage {s!r}; stages are {', '.join(STAGES)}")
    if from_stage:
        chosen = [s for s in chosen if STAGES.index(s) >= STAGES.index(from_stage)]
    return [s for s in STAGES if s in chosen]


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _key_metrics(summary: dict) -> str:
    items = [(k, v) for k, v in summary.items() if isinstance(v, (int, float)) and k not in ("wall_s",)]
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items[:5])


def check_writable(run_dir: Path) -> None:
    """Fail in one line, before any stage starts, when the run folder cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / ".write-check", "ok\n")
        (run_dir / ".write-check").unlink()
    except OSError as e:
        raise StageError(f"cannot write the run folder {run_dir}: {e.strerror or e}") from None


def preflight(cfg, selected: list[str], launch) -> None:
    from pipeline.preflight import available_bytes, check_models, check_references, estimate_memory, validate_data

    print("preflight:")
    for line in validate_data(cfg, selected):
        print(f"  data  {line}")
    for line in check_references(cfg, selected):
        print(f"  ref   {line}")
    print(f"  model {check_models(cfg)}")
    try:
        avail, kind = available_bytes()
        for est in estimate_memory(cfg, launch):
            if est.stage not in selected:
                continue
            gib = est.bytes_per_device / 1024**3
            print(f"  mem   {est.stage:<6} ~{gib:.1f} GiB per device ({est.trainable / 1e6:.1f}M trainable; {est.detail})")
            if est.bytes_per_device > avail:
                print(f"  WARNING: {est.stage} needs ~{gib:.1f} GiB per device but only {avail / 1024**3:.1f} GiB "
                      f"{kind} is free: lower batch sizes, shard with FSDP2 (configs/accelerate/fsdp_8gpu.yaml) or "
                      "enable LoRA", file=sys.stderr)
    except (OSError, ValueError) as e:  # an estimate must never block a run
        print(f"  mem   (no estimate: {str(e).splitlines()[0]})")


def remove_stage_outputs(sdir: Path) -> None:
    """Delete what the pipeline and the stage wrote in `sdir` (STAGE_OUTPUTS, *.png, hidden staging
    files), never anything else."""
    if not sdir.is_dir():
        return
    for entry in sdir.iterdir():
        ours = (entry.name in STAGE_OUTPUTS or entry.suffix == ".png"
                or entry.name.startswith(".") and entry.name.endswith((".partial", ".tmp", ".old")))
        if not ours:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)


def _prepare_stage_dir(cfg, run_dir: Path, stage: str, stage_hash: str, force: bool) -> None:
    sdir = stage_dir(run_dir, stage)
    clear_done(run_dir, stage)
    attempt = sdir / ATTEMPT
    prev = json.loads(attempt.read_text()).get("config_hash") if attempt.exists() else None
    if force or (prev is not None and prev != stage_hash):
        # Checkpoints made under another config must not be resumed: start this stage clean.
        remove_stage_outputs(sdir)
    sdir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(attempt, {"config_hash": stage_hash, "started": time.time()})
    # Downstream outputs are stale once this stage re-runs.
    for later in STAGES[STAGES.index(stage) + 1:]:
        if stage in upstream(cfg, later):
            clear_done(run_dir, later)


def _ignore_sigint() -> None:
    # The launcher (`accelerate launch`) ignores Ctrl-C, so it prints no traceback; the stage process
    # restores the default handler (stages.core.entry.stage_main) and stops cleanly; the orchestrator waits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_stage_process(cmd: list[str], env: dict, pass_fds: tuple[int, ...] = ()) -> tuple[int, str | None, bool]:
    """Run one stage launch; return (exit code, the stage's one-line error if it printed one, interrupted).

    The stage writes its one-line error to RLHF_STAGE_ERROR_FILE, a temp file outside the run folder
    (which may be the full disk): `accelerate launch` turns every failure into exit code 1, so the file
    is how the orchestrator tells a reported error (exit 2) from a crash."""
    fd, err_path = tempfile.mkstemp(prefix="rlhf-stage-error-", suffix=".txt")
    os.close(fd)
    interrupted = False
    try:
        proc = subprocess.Popen(cmd, env={**env, "RLHF_STAGE_ERROR_FILE": err_path}, preexec_fn=_ignore_sigint,
                                pass_fds=pass_fds)
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # the stage got the same Ctrl-C; let it stop, then report
                interrupted = True
                try:
                    code = proc.wait(timeout=30)
                    break
                except (subprocess.TimeoutExpired, KeyboardInterrupt):
                    proc.kill()
        try:
            error = Path(err_path).read_text(encoding="utf-8").strip().splitlines()
        except OSError:
            error = []
        return code, (error[-1] if error else None), interrupted
    finally:
        Path(err_path).unlink(missing_ok=True)


def _remove_partial_outputs(sdir: Path) -> None:
    """A failed stage's staging files are incomplete by definition; removing them frees the space a
    full disk needs for the manifest update."""
    if not sdir.is_dir():
        return
    for entry in list(sdir.rglob(".*")):
        if entry.name.endswith((".partial", ".tmp")):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def run_pipeline(cfg, stages=None, from_stage=None, force=False, dry_run=False, config_path=None) -> int:
    from pipeline.preflight import check_writable as check_writable_before

    selected = select_stages(stages, from_stage)
    run_dir = run_dir_for(cfg)
    hashes = stage_hashes(cfg)
    for s in selected:
        for u in upstream(cfg, s):
            if u not in selected and (read_done(run_dir, u) or {}).get("config_hash") != hashes[u]:
                raise StageError(f"{s} reads the {u} stage's output, which is missing or was made with another "
                                 f"config: run `rlhf {u} CONFIG` first, or include {u} in --stages/--from")
    # Everything is checked before the run folder is created: bad input leaves no empty runs/<name>.
    check_writable_before(run_dir)
    preflight(cfg, selected, cfg.launch)
    # On multi-node runs every node runs this orchestrator; node 0 alone writes the shared bookkeeping.
    primary = cfg.launch.machine_rank == 0
    lock = None
    if not dry_run:
        check_writable(run_dir)
        if primary:
            lock = RunLock(run_dir).acquire()
    try:
        return _run_locked(cfg, run_dir, selected, hashes, force, dry_run, config_path, primary,
                           () if lock is None else (lock.fd,))
    finally:
        if lock is not None:
            lock.release()


def _run_locked(cfg, run_dir: Path, selected, hashes, force, dry_run, config_path, primary, lock_fds) -> int:
    plan = []
    for s in selected:
        done = read_done(run_dir, s)
        fresh = done is not None and done.get("config_hash") == hashes[s] and not force
        plan.append((s, "skip (done, unchanged)" if fresh else "run"))
    print(f"run folder: {run_dir}")
    for s, what in plan:
        print(f"  {s:<9} {what}")
    if dry_run:
        return 0

    if primary:
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    manifest = Manifest(run_dir, read_only=not primary)
    manifest.data.update(name=cfg.name, config_path=str(config_path) if config_path else None)
    rows = [["stage", "status", "wall", "key metrics"]]
    code = 0
    for s, what in plan:
        sdir = stage_dir(run_dir, s)
        if what.startswith("skip"):
            done = read_done(run_dir, s)
            rows.append([s, "skipped", f"{done.get('wall_s', 0):.0f}s", _key_metrics(done.get("metrics", {}))])
            manifest.update(s, status="done", skipped_last_run=True)
            continue
        if primary:
            _prepare_stage_dir(cfg, run_dir, s, hashes[s], force)
        manifest.update(s, status="running", config_hash=hashes[s])
        print(f"\n==== {s} ====", flush=True)
        t0 = time.time()
        rc, error, interrupted = run_stage_process(stage_command(cfg.launch, s, run_dir), stage_env(), lock_fds)
        interrupted = interrupted or error == interrupted_line(s)
        wall = time.time() - t0
        if interrupted or rc != 0:
            _remove_partial_outputs(sdir)
            status = "interrupted" if interrupted else "failed"
            manifest.update(s, status=status, exit_code=rc, error=error, wall_s=round(wall, 1))
            rows.append([s, "INTERRUPTED" if interrupted else f"FAILED ({rc})", f"{wall:.0f}s", ""])
            if interrupted:
                print(f"interrupted: stage {s} stopped; completed stages are kept, re-run the same command to resume",
                      file=sys.stderr)
                code = 130
            else:
                print(f"error: stage {s} failed with exit code {rc}; completed stages are kept, "
                      f"re-run the same command to resume", file=sys.stderr)
                # A stage that reported its one-line error is bad input or a bad disk: exit 2, as the CLI's
                # own errors. A crash without one (a bug) keeps exit 1.
                code = 2 if error else 1
            break
        summary_path = sdir / "summary.json"
        metrics = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        artifacts = sorted(p.name for p in sdir.iterdir() if not p.name.startswith("."))
        record = {"config_hash": hashes[s], "wall_s": round(wall, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "metrics": metrics}
        if primary:
            write_done(run_dir, s, record)
        manifest.update(s, status="done", wall_s=round(wall, 1), metrics=metrics, artifacts=artifacts,
                        skipped_last_run=False)
        rows.append([s, "done", f"{wall:.0f}s", _key_metrics(metrics)])
    print()
    _print_table(rows)
    return code
