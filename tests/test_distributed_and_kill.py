"""`rlhf run` as a user drives it, with processes that really die or really run in parallel:

- one stage on 2 CPU processes (gloo DDP via accelerate --multi_gpu): both ranks train, rank 0
  alone writes the run folder;
- SIGKILL of a stage during training, in the middle of a checkpoint write and in the middle of the
  final save; the next `rlhf run` resumes, the manifest is consistent and at most one checkpoint
  interval of work is redone.

The file-write audit and the mid-write kills come from tests/instrument/sitecustomize.py, loaded into
every process through PYTHONPATH; the product has no test hooks.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INSTRUMENT = Path(__file__).resolve().parent / "instrument"
SAVE_EVERY, STEPS = 2, 6


def rlhf(args, env_extra=None, timeout=600):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(INSTRUMENT), str(REPO)]), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def audit(audit_dir: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(audit_dir.glob("writes-*.jsonl")) for line in f.read_text().splitlines()]


# ---- 2 CPU processes ----

def test_sft_on_two_cpu_processes_both_ranks_train_rank0_alone_writes(tmp_path, tiny_model_dir):
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    root = tmp_path / "runs"
    proc = rlhf(["run", "configs/tiny.yaml", "--stages", "sft", f"runs_root={root}", "launch.num_processes=2",
                 "launch.cpu_ddp=true", "launch.main_process_port=29517", "sft.max_steps=4", "sft.batch_size=2"],
                {"RLHF_TEST_AUDIT_DIR": str(audit_dir), "RLHF_TEST_AUDIT_ROOT": str(root)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = root / "tiny"
    summary = json.loads((run_dir / "sft" / "summary.json").read_text())
    assert summary["world_size"] == 2
    # both ranks ran 4 optimizer steps of 2 items each (the global batch is 2 x 2)
    assert summary["items_per_rank"] == [8, 8] and summary["steps"] == 4
    assert (run_dir / "sft" / "model" / "model.safetensors").exists()

    writes = audit(audit_dir)
    ranks = {w["rank"] for w in writes}
    assert "0" in ranks, "the audit saw no write at all"
    stray = [w for w in writes if w["rank"] != "0"]
    assert not stray, f"a rank other than 0 wrote into the run folder: {stray[:3]}"
    # one stage process wrote the stage folder, besides the orchestrator (manifest, .attempt.json, DONE)
    orchestrator = {w["pid"] for w in writes if w["path"].endswith("/manifest.json")}
    stage_writers = {w["pid"] for w in writes if "/sft/" in w["path"]} - orchestrator
    assert len(orchestrator) == 1 and len(stage_writers) == 1


# ---- SIGKILL and resume ----

KILL_AT = {  # where: (path regex, nth matching write, the last checkpoint left)
    # the 5th metrics line is written right after step 5 trained: the last checkpoint is step 4
    "training": (r"/sft/metrics\.jsonl$", 5, 4),
    # step-4's files are staged; the rename that would publish the checkpoint never happens
    "checkpoint": (rf"/sft/checkpoints/step-{2 * SAVE_EVERY}$", 1, 2),
    # every step trained and checkpointed; the exported model folder is never moved into place
    "final save": (r"/sft/model$", 1, STEPS),
}


def _kill_at(tmp_path, where: str):
    """`rlhf run --stages sft` whose stage process SIGKILLs itself at `where`; (run_dir, exit code, output)."""
    pattern, nth, _ = KILL_AT[where]
    root = tmp_path / "runs"
    res = rlhf(["run", "configs/tiny.yaml", "--stages", "sft", f"runs_root={root}", f"sft.max_steps={STEPS}",
                f"sft.save_steps={SAVE_EVERY}", "sft.batch_size=2"],
               {"RLHF_TEST_KILL_ON": pattern, "RLHF_TEST_KILL_NTH": str(nth)})
    return root / "tiny", res.returncode, res.stdout + res.stderr


@pytest.mark.parametrize("where", ["training", "checkpoint", "final save"])
def test_sigkill_then_rlhf_run_resumes_and_the_manifest_is_consistent(tmp_path, tiny_model_dir, where):
    run_dir, code, out = _kill_at(tmp_path, where)
    assert code != 0, out[-2000:]
    assert not (run_dir / "sft" / "DONE").exists()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["sft"]["status"] == "failed"
    assert "re-run the same command to resume" in out
    if where == "final save":
        # every step trained; the model folder was never half-written into place
        assert not (run_dir / "sft" / "model").exists()
    ckpts = sorted(int(p.name.split("-")[1]) for p in (run_dir / "sft" / "checkpoints").glob("step-*")
                   if (p / "trainer_state.json").exists())
    last_good = ckpts[-1] if ckpts else 0
    assert last_good == KILL_AT[where][2], ckpts
    logged = [json.loads(x)["step"] for x in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert last_good >= max(logged) - SAVE_EVERY, (ckpts, logged)  # at most one interval of work lost

    res = rlhf(["run", "configs/tiny.yaml", "--stages", "sft", f"runs_root={run_dir.parent}",
                f"sft.max_steps={STEPS}", f"sft.save_steps={SAVE_EVERY}", "sft.batch_size=2"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"sft: resuming from {run_dir / 'sft' / 'checkpoints' / f'step-{last_good}'}" in res.stdout
    summary = json.loads((run_dir / "sft" / "summary.json").read_text())
    assert summary["resumed_from"] == last_good and summary["steps"] == STEPS
    assert summary["items_per_rank"] == [2 * (STEPS - last_good)]  # only the remaining steps were trained
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["sft"]["status"] == "done" and (run_dir / "sft" / "DONE").exists()
    steps = [json.loads(x)["step"] for x in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, STEPS + 1))  # each step logged once: nothing lost, nothing doubled
    assert (run_dir / "sft" / "model" / "model.safetensors").exists()
    assert not list(run_dir.rglob("*.tmp")) and not list(run_dir.rglob(".*.partial"))
