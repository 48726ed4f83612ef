"""Issue 20, one test (or a few) per numbered defect: a run-folder lock, names that stay inside
runs_root, a pre-flight that resolves what the stages will open, exit code 2 for stage errors and a
clean Ctrl-C, a full disk as one line with the manifest at `failed`, local paths never sent to the
hub, non-finite settings and a guard that ends on a rollback rejected, and the small things."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_distributed_and_kill import INSTRUMENT, rlhf
from test_ppo import make_run, upstream  # noqa: F401 - `upstream` is a fixture

from pipeline.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`rlhf ARGV` in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out, err = capsys.readouterr()
    return e.value.code, out, err


def one_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def popen_rlhf(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(INSTRUMENT), str(REPO)]), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def wait_for(predicate, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not predicate():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.2)


# ---- 1. one run per folder ----

def test_second_run_on_the_same_folder_is_refused_while_the_first_runs(tmp_path, tiny_model_dir):
    root = tmp_path / "runs"
    run_dir = root / "tiny"
    args = ["run", "configs/tiny.yaml", "--stages", "sft", f"runs_root={root}", "name=tiny"]
    first = popen_rlhf(args)
    # the first one holds the folder once its stage is running
    wait_for(lambda: (run_dir / "sft" / ".attempt.json").exists() or first.poll() is not None)
    assert first.poll() is None, first.communicate()
    second = rlhf([*args, "--force"])
    out, err = first.communicate(timeout=600)
    assert second.returncode == 2, second.stderr[-3000:]
    assert one_line(second.stderr) == (f"error: run folder {run_dir} in use by PID {first.pid}: wait for that run to "
                                       f"finish, or choose another name=")
    assert first.returncode == 0, err[-3000:]
    steps = [r["step"] for r in map(json.loads, (run_dir / "sft" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == [1, 2, 3]  # no rows from a second writer
    # the lock dies with its process: the next run proceeds (everything is done: it skips)
    again = rlhf(args)
    assert again.returncode == 0 and "skip (done, unchanged)" in again.stdout


def test_lock_is_exclusive_and_names_the_owner(tmp_path):
    from pipeline.rundir import RunLock
    from stages.core.errors import StageError

    held = RunLock(tmp_path).acquire()
    try:
        with pytest.raises(StageError, match=rf"in use by PID {os.getpid()}:"):
            RunLock(tmp_path).acquire()
    finally:
        held.release()
    RunLock(tmp_path).acquire().release()


# ---- 2. names stay inside runs_root; --force removes only pipeline outputs ----

@pytest.mark.parametrize("name", ["..", ".", ".hidden", "-x", "a/b"])
def test_run_name_outside_runs_root_is_rejected(tmp_path, monkeypatch, capsys, name):
    work = tmp_path / "dd"
    (work / "sft").mkdir(parents=True)
    (work / "sft" / "important.txt").write_text("keep me")
    monkeypatch.chdir(work)
    code, _, err = cli(capsys, "run", TINY, f"name={name}", "--stages", "sft", "--force")
    assert code == 2
    assert one_line(err).startswith("config error: ") and "'name'" in err
    assert (work / "sft" / "important.txt").read_text() == "keep me"
    assert sorted(p.name for p in work.iterdir()) == ["sft"]  # no config.yaml, manifest.json, runs/


def test_run_dir_must_resolve_inside_runs_root(tmp_path):
    from types import SimpleNamespace

    from pipeline.rundir import run_dir_for
    from stages.core.errors import StageError

    root = tmp_path / "runs"
    root.mkdir()
    (root / "escape").symlink_to(tmp_path)  # a name that is a link out of runs_root
    with pytest.raises(StageError, match="outside runs_root"):
        run_dir_for(SimpleNamespace(runs_root=str(root), name="escape/.."))
    assert run_dir_for(SimpleNamespace(runs_root=str(root), name="ok")) == root / "ok"


def test_force_removes_only_what_the_pipeline_wrote(tmp_path):
    from pipeline.orchestrator import remove_stage_outputs

    sdir = tmp_path / "sft"
    for d in ("model", "checkpoints/step-3", "tensorboard", ".model.partial"):
        (sdir / d).mkdir(parents=True)
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "DONE", ".attempt.json", "lengths.png",
              "important.txt", "notes/mine.md"):
        (sdir / f).parent.mkdir(parents=True, exist_ok=True)
        (sdir / f).write_text("x")
    remove_stage_outputs(sdir)
    assert sorted(str(p.relative_to(sdir)) for p in sdir.rglob("*")) == ["important.txt", "notes", "notes/mine.md"]


# ---- 3. pre-flight resolves everything a stage will need ----

PREFLIGHT_ERRORS = [
    ("ppo.reward_fn=foo", "error: ppo.reward_fn 'foo' must look like 'module:function'"),
    ("ppo.reward_fn=no_such_module_xyz:f", "error: ppo.reward_fn 'no_such_module_xyz:f': cannot import"),
    ("ppo.reward_fn=stages.rl.reward_functions:no_such_fn", "error: ppo.reward_fn 'stages.rl.reward_functions:no_such_fn': stages.rl.reward_functions has no function"),
    ("launch.accelerate_config=/nope.yaml", "error: launch.accelerate_config: /nope.yaml: no such file"),
    (f"launch.accelerate_config={TINY}", "config error: launch.accelerate_config: " + TINY + ": not an accelerate config"),
    ("compare.models=[sft,nope]", "error: compare.models[1]: nope is not a local folder and not in the Hugging Face cache"),
    ("reward.init_from=/nonexistent", "error: reward.init_from: model folder /nonexistent does not exist"),
    ("baseline.prompt_file=/nope.txt", "error: baseline.prompt_file: /nope.txt: no such file"),
    ("ppo.policy=./no/such/policy", "error: ppo.policy: model folder ./no/such/policy does not exist"),
    ("compare.reference=/nonexistent/ref", "error: compare.reference: model folder /nonexistent/ref does not exist"),
    ("runs_root=/proc/no-runs-here", "error: cannot write the run folder /proc/no-runs-here/tiny: "),
]


@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("override,expected", PREFLIGHT_ERRORS, ids=[o for o, _ in PREFLIGHT_ERRORS])
def test_config_errors_fail_in_preflight_before_any_stage(tmp_path, capsys, monkeypatch, override, expected, dry):
    launched = []
    monkeypatch.setattr("pipeline.orchestrator.run_stage_process", lambda *a, **k: launched.append(a) or (0, None, False))
    root = tmp_path / "runs"
    args = ["run", TINY, f"runs_root={root}", override, *(["--dry-run"] if dry else [])]
    if override.startswith("runs_root"):
        args.remove(f"runs_root={root}")
    code, _, err = cli(capsys, *args)
    assert code == 2
    assert one_line(err).startswith(expected), err
    assert not launched and not (root / "tiny").exists()  # no stage started, no run folder left behind


# ---- 4. a stage error is exit code 2 from `rlhf run`; Ctrl-C is one line and `interrupted` ----

def test_stage_error_exits_2_through_accelerate(tmp_path, tiny_model_dir):
    root = tmp_path / "runs"
    res = rlhf(["run", "configs/tiny.yaml", "--stages", "reward", f"runs_root={root}", "reward.init_from=tiny-random-llama",
                "reward.freeze_layers=5"])
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: reward: freeze_layers=5 but the model has 2 layers; leave at least one to train",
                      "error: stage reward failed with exit code 1; completed stages are kept, re-run the same "
                      "command to resume"]
    stage = json.loads((root / "tiny" / "manifest.json").read_text())["stages"]["reward"]
    assert stage["status"] == "failed" and stage["error"] == errors[0]


def test_ctrl_c_is_one_line_and_the_manifest_says_interrupted(tmp_path, tiny_model_dir):
    root = tmp_path / "runs"
    proc = popen_rlhf(["run", "configs/tiny.yaml", "--stages", "sft", f"runs_root={root}", "sft.max_steps=400"],
                      start_new_session=True)  # a process group of its own, like a shell's foreground job
    metrics = root / "tiny" / "sft" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() or proc.poll() is not None)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    # what is left once tqdm's progress bars (redrawn with \r) are taken out
    lines = [part for part in re.split(r"[\r\n]", re.sub(r"[\w ]+: +\d+%\|[^\]]*\]", "", err)) if part.strip()]
    assert lines[-1] == "interrupted: stage sft stopped; completed stages are kept, re-run the same command to resume"
    assert len(lines) <= 2, lines  # the stage's "sft: interrupted" and the orchestrator's line
    stage = json.loads((root / "tiny" / "manifest.json").read_text())["stages"]["sft"]
    assert stage["status"] == "interrupted"


def test_a_stage_stopped_by_sigint_alone_is_reported_interrupted(tmp_path, tiny_model_dir):
    """The stage process gets SIGINT and the orchestrator does not (a `kill -INT` of the stage, or a
    Ctrl-C the orchestrator did not see under heavy load): still `interrupted`, exit 130, not a crash."""
    import psutil

    root = tmp_path / "runs"
    proc = popen_rlhf(["run", "configs/tiny.yaml", "--stages", "sft", f"runs_root={root}", "sft.max_steps=400"],
                      start_new_session=True)
    metrics = root / "tiny" / "sft" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() or proc.poll() is not None)
    stage = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "stages.sft" in " ".join(p.cmdline()) and "accelerate" not in " ".join(p.cmdline()))
    stage.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert err.rstrip().splitlines()[-1] == ("interrupted: stage sft stopped; completed stages are kept, "
                                             "re-run the same command to resume")
    assert json.loads((root / "tiny" / "manifest.json").read_text())["stages"]["sft"]["status"] == "interrupted"


# ---- 5. a full disk: one line, manifest `failed` ----

@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); test_full_disk_during_the_model_export injects ENOSPC")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_full_disk_on_a_3mb_tmpfs_is_one_line_and_failed(small_tmpfs, tiny_model_dir):
    res = rlhf(["run", "configs/tiny.yaml", "--stages", "sft", f"runs_root={small_tmpfs}"])
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    stage = json.loads((small_tmpfs / "tiny" / "manifest.json").read_text())["stages"]["sft"]
    assert stage["status"] == "failed"
    assert stage["error"].startswith(f"error: sft: no space left on device while writing under {small_tmpfs}/tiny/sft")
    assert not list((small_tmpfs / "tiny" / "sft").rglob("*.partial"))


def test_disk_full_is_recognised_whatever_raised_it(tmp_path):
    import errno

    from stages.core.errors import disk_full_error

    class SafetensorError(Exception):
        pass

    assert disk_full_error(SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                           "message: \"No space left on device\" })"))
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert disk_full_error(wrapped)
    assert not disk_full_error(RuntimeError("shape mismatch"))


def test_manifest_is_marked_failed_even_when_the_disk_is_full(tmp_path, monkeypatch):
    import errno

    from pipeline import rundir

    m = rundir.Manifest(tmp_path)
    m.update("sft", status="running", config_hash="abc")

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir, "atomic_write_json", full)
    m.update("sft", status="failed", exit_code=1)
    assert json.loads((tmp_path / "manifest.json").read_text())["stages"]["sft"]["status"] == "failed"


# ---- 6. local-looking paths never go to the hub; offline hub names fail at once ----

@pytest.mark.parametrize("model,expected", [
    ("/nonexistent/model", "error: model: model folder /nonexistent/model does not exist"),
    ("EMPTY", "error: model: {} has no config.json, so it is not a Hugging Face model folder"),
    ("nobody/no-such-model-xyz", "error: model: nobody/no-such-model-xyz is not a local folder and not in the Hugging "
                                 "Face cache, and HF_HUB_OFFLINE is set"),
])
def test_model_references_fail_at_once_with_one_line(tmp_path, capsys, monkeypatch, model, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if model == "EMPTY":
        model = str(tmp_path / "empty")
        (tmp_path / "empty").mkdir()
        expected = expected.format(model)
    t0 = time.time()
    code, _, err = cli(capsys, "run", TINY, f"model={model}", f"runs_root={tmp_path / 'runs'}", "--dry-run")
    assert time.time() - t0 < 5
    assert code == 2
    assert one_line(err).startswith(expected)


# ---- 7. non-finite or degenerate settings; a guard that gives up fails the stage ----

@pytest.mark.parametrize("override,expected", [
    ("ppo.lr=inf", "'ppo.lr': Input should be a finite number"),
    ("sft.lr=inf", "'sft.lr': Input should be a finite number"),
    ("reward.lr=.nan", "'reward.lr': Input should be a finite number"),
    ("ppo.kl_coef=-.inf", "'ppo.kl_coef': Input should be a finite number"),
    ("sft.max_steps=0", "'sft.max_steps': 0 would train nothing"),
])
def test_non_finite_and_degenerate_values_are_rejected(capsys, override, expected):
    code, _, err = cli(capsys, "config", "validate", TINY, override)
    assert code == 2 and expected in one_line(err)


@pytest.mark.parametrize("text,expected", [
    ("", "the file has no settings"),
    ("# only a comment\n", "the file has no settings"),
    ("{}\n", "the file has no settings"),
    ("name: a\nsft:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", "line 4: invalid YAML (duplicate key 'lr' (first at line 3))"),
])
def test_empty_and_duplicate_key_yaml_are_rejected(tmp_path, capsys, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    code, _, err = cli(capsys, "config", "validate", str(path))
    assert code == 2 and expected in one_line(err)


def test_guard_that_ends_on_a_rollback_fails(tmp_path):
    import torch

    from stages.core.config_schema import GuardConfig
    from stages.core.errors import StageError
    from stages.training.guard import SpikeGuard

    lin = torch.nn.Linear(2, 2)
    guard = SpikeGuard(GuardConfig(), {"model": lin})
    assert guard.check(1, loss=1.0)
    guard.after_step(1)
    assert not guard.check(2, loss=float("nan"))  # rolled back, and training ends here
    with pytest.raises(StageError, match=r"training ended without a good step after the last spike \(step 2: "
                                         r"non-finite loss"):
        guard.finish()
    assert guard.check(3, loss=1.0)
    guard.after_step(3)
    guard.finish()  # a good step after the spike: the stage may finish


def test_ppo_whose_guard_restores_step_0_fails_instead_of_exporting(tmp_path, upstream):  # noqa: F811
    from stages import ppo
    from stages.core.errors import StageError

    cfg, run_dir = make_run(tmp_path, upstream, lr=1e30, value_lr=1e30)  # finite, and ruinous
    with pytest.raises(StageError, match="spike guard: training ended without a good step after the last spike"):
        ppo.run(cfg, run_dir)
    assert not (run_dir / "ppo" / "model").exists()


# ---- 9. noise and small things ----

def test_config_show_into_a_closed_pipe_is_quiet():
    proc = subprocess.run(f"{sys.executable} -m pipeline.cli config show configs/tiny.yaml | head -1", shell=True,
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.stdout == "name: tiny\n" and proc.stderr == "", proc.stderr


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    from data_schemas.files import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_report_md_does_not_render_links_or_images_from_model_text():
    from stages.evaluation.report import md_text

    text = md_text("click [here](http://evil.example) ![x](http://evil.example/i.png) **loud** <b>")
    assert "[here](" not in text and "![x](" not in text and "**loud**" not in text and "<b>" not in text
    assert text == (r"click \[here\]\(http://evil.example\) \!\[x\]\(http://evil.example/i.png\) \*\*loud\*\* "
                    "&lt;b&gt;")


def test_data_preview_shortens_huge_fields(tmp_path, capsys):
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"prompt": "p" * 1_000_000, "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["data", "preview", str(path), "--format", "trl"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and len(out) < 5000 and "998,000 more characters" in out


def test_reward_model_load_is_one_plain_line(tiny_model_dir, capfd):
    from stages.modeling.loading import load_reward_model

    load_reward_model(str(tiny_model_dir))
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "\x1b[" not in err
    assert "reward model: a new score head (score.weight) initialised at random" in err


def test_shared_prefix_generation_has_no_deprecation_warning(tiny_model_dir):
    import warnings

    from stages.core.config_schema import Decoding
    from stages.evaluation.responders import PromptedBaseline

    preamble = (REPO / "configs" / "prompts" / "dialogue_prompted.txt").read_text()
    bot = PromptedBaseline("baseline", str(tiny_model_dir), Decoding(max_new_tokens=2, temperature=0), preamble)
    conv = [{"role": "user", "content": "hi"}]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        bot.respond([conv, conv])
    assert bot._prefix is not None  # the KV-cached shared prefix (where the deprecated argument was) was used


# ---- 8. RM memory: freed activation blocks go back to the OS ----

FRAGMENTATION = """
import random, sys
import psutil, torch
heap = None
if sys.argv[1] == "stage":
    from stages.core.runtime import HeapTrim
    heap = HeapTrim()
rng, keep, rss = random.Random(0), [], []
for step in range(60):
    length = rng.randint(300, 3000)  # a packed row: another length every step
    acts = []
    for layer in range(12):
        acts += [torch.ones(length, 576), torch.ones(length, 1536)]  # a step's activations, a few MB each
        keep.append(torch.ones(64))  # small tensors that outlive the step (logged metrics, optimizer state)
    del acts
    if heap is not None:
        heap.step()  # what the training loop calls after each step
    rss.append(psutil.Process().memory_info().rss)
print(max(rss[5:]) / max(rss[:5]))  # the peak after warm-up against the peak during it
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_training_loop_heap_trim_keeps_rss_flat_across_varying_packed_rows():
    def growth(mode: str) -> float:
        proc = subprocess.run([sys.executable, "-c", FRAGMENTATION, mode], cwd=REPO, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        return float(proc.stdout.strip())

    # The pattern really fragments glibc's heap (measured: 4.4-5.9x). Twice in ~15 parallel-suite runs
    # one process did not fragment (1.05x; cause not found, address-space layout suspected), so this
    # precondition needs one of up to three processes to fragment; the claim under test, below, gets one.
    assert any(growth("default") > 1.5 for _ in range(3))
    assert growth("stage") < 1.15   # with the training loop's HeapTrim, RSS stays flat (measured: 1.03-1.05x)


def test_heap_trim_leaves_a_steady_heap_alone():
    """Trimming makes the next step fault its pages back in (~0.6 s of a 2.1 s RM step here), so a
    loop whose blocks are reused step after step must never trim."""
    import torch

    from stages.core.runtime import HeapTrim

    heap = HeapTrim()
    for _ in range(20):
        acts = [torch.ones(1000, 576) for _ in range(24)]  # the same shapes every step
        del acts
        heap.step()
    assert heap.steps == 20 and heap.trims == 0
