"""Every training stage on 2 CPU processes, driven through `rlhf run`, under DDP (gloo, through
`accelerate launch --multi_gpu`) and under FSDP2 (torch's fully_shard over gloo,
configs/accelerate/cpu_fsdp2.yaml), and 2 ranks against 1 rank on the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def rlhf(args, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def changed(a: dict, b: dict) -> int:
    """How many tensors shared by name differ between two state dicts."""
    return sum(not torch.equal(a[k].float(), b[k].float()) for k in a.keys() & b.keys())


# How `rlhf run` is told to use each backend on 2 CPU processes.
BACKENDS = {"ddp": ["launch.cpu_ddp=true"],
            "fsdp2": ["launch.accelerate_config=configs/accelerate/cpu_fsdp2.yaml"]}
# The end-to-end run's PPO: under DDP with advantage 'group' (no value model; each rank samples its
# own prompts' groups), under FSDP2 with the value model (sharded and resumed beside the policy).
PPO_ADVANTAGE = {"ddp": ["ppo.advantage=group", "ppo.samples_per_prompt=2"], "fsdp2": []}
# The 1-rank-vs-2-rank comparisons take ~1 min each per backend: DDP's run in the fast suite, FSDP2's
# in the slow one (`make test-slow`); FSDP2's end-to-end run with resume is in the fast suite.
PARITY = [pytest.param("ddp"), pytest.param("fsdp2", marks=pytest.mark.slow)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sft_reward_and_ppo_on_two_cpu_ranks(tmp_path, tiny_model_dir, backend):
    """Every training stage on 2 ranks: artifacts that load in plain transformers, weights that moved,
    and a PPO run that resumes from its sharded (FSDP2) or replicated (DDP) checkpoint."""
    common = ["configs/tiny.yaml", f"runs_root={tmp_path}", "launch.num_processes=2", "launch.main_process_port=29531",
              *BACKENDS[backend], "sft.batch_size=2", "reward.batch_size=2", "ppo.batch_size=2", "ppo.mini_batch_size=1",
              *PPO_ADVANTAGE[backend]]
    proc = rlhf(["run", "--stages", "sft,reward,ppo", *common])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "tiny"
    for stage in ("sft", "reward", "ppo"):
        summary = json.loads((run / stage / "summary.json").read_text())
        assert (summary["world_size"], summary["backend"]) == (2, backend), stage
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    AutoModelForCausalLM.from_pretrained(run / "ppo" / "model")  # whole tensors, not shards
    AutoModelForSequenceClassification.from_pretrained(run / "reward" / "model")
    base, sft, rm, ppo = (weights(p) for p in (tiny_model_dir, run / "sft" / "model", run / "reward" / "model",
                                                run / "ppo" / "model"))
    assert changed(base, sft) > 0 and changed(sft, ppo) > 0
    rm_body = {k.removeprefix("model."): v for k, v in rm.items()}  # LlamaForSequenceClassification vs CausalLM
    assert changed({k.removeprefix("model."): v for k, v in sft.items()}, rm_body) > 0
    # 2 iterations, one metrics row each
    rows = [json.loads(x) for x in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "kl" in r] == [1, 2]
    # Before the first update policy and reference are the same weights: KL 0 under the run's precision
    # (bf16 where the CPU has it). Under FSDP2 that holds because mixed precision stays autocast. Up to
    # rounding: fp32 products on an AVX2-only CPU round differently per batch shape (1.2e-6 seen).
    assert abs(next(r for r in rows if "kl" in r)["kl"]) < 1e-5
    # Two more iterations resume from iteration 2's checkpoint (weights and Adam states, sliced back
    # into each rank's shard under FSDP2) and keep training: the stage launched as the orchestrator
    # launches it, with `ppo.iterations` (a field a resume may change) raised.
    import yaml

    from pipeline.config import load_config
    from pipeline.launcher import stage_command

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    resolved["ppo"]["iterations"] = 4
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(resolved))
    launch = load_config(REPO / common[0], common[1:]).launch
    cmd = stage_command(launch, "ppo", run) + ["--config", str(tmp_path / "resume.yaml")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ppo: resuming from" in proc.stdout
    assert json.loads((run / "ppo" / "summary.json").read_text())["resumed_from"] == 2
    rows = [json.loads(x) for x in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "kl" in r] == [1, 2, 3, 4]
    assert changed(ppo, weights(run / "ppo" / "model")) > 0
    has_value = backend != "ddp"
    assert (run / "ppo" / "checkpoints" / "iter-4" / "value.safetensors").exists() == has_value
    assert any("value_loss" in r for r in rows) == has_value


def _sft_step(root: Path, model: Path, processes: int, per_rank_batch: int, port: int,
              backend: str = "ddp") -> tuple[dict, dict]:
    args = ["run", "configs/tiny.yaml", "--stages", "sft", f"runs_root={root}", f"model={model}", "sft.max_steps=1",
            f"sft.batch_size={per_rank_batch}", "sft.max_length=1024", "precision=fp32",
            "seed=3"]  # seed 3: the two ranks get 43 and 25 target tokens (seed 0 happens to give 33 and 33)
    if processes > 1:
        args += [f"launch.num_processes={processes}", *BACKENDS[backend], f"launch.main_process_port={port}"]
    proc = rlhf(args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = json.loads((root / "tiny" / "sft" / "metrics.jsonl").read_text().splitlines()[0])
    return row, weights(root / "tiny" / "sft" / "model")


def assert_same_update(w1: dict, w2: dict) -> None:
    """Adam's first step moves each weight by ~lr (1e-3) in its gradient's direction. The reduction order
    differs across ranks, so a weight whose gradient is near Adam's eps may move a little differently
    (seen: 1 of 3.2M weights by 3e-5 on an AMX Xeon; 9, by at most 2e-4, on an AVX2-only AMD EPYC), but
    none the other way (a 2e-3 difference); every other weight must move identically."""
    assert w1.keys() == w2.keys()
    diffs = torch.cat([(w2[k].float() - w1[k].float()).abs().flatten() for k in w1])
    assert diffs.max() < 1e-3 and int((diffs > 1e-6).sum()) <= 10, (diffs.max(), int((diffs > 1e-6).sum()))


@pytest.mark.parametrize("backend", PARITY)
def test_two_ranks_take_the_step_one_rank_takes_on_the_same_global_batch(tmp_path, tiny_model_dir, backend):
    """One SFT step on 4 demonstrations: 1 rank x 4 against 2 ranks x 2. The demonstrations differ in
    length, so this also checks that every target token weighs the same whichever rank holds it."""
    # From a partly trained model: on the random one every token's loss is ~ln(vocab), and a rank
    # weighting that ignored token counts would go unseen.
    warm = rlhf(["run", "configs/tiny.yaml", "--stages", "sft", f"runs_root={tmp_path / 'warm'}", "sft.max_steps=30",
                 "sft.lr=1e-2", "sft.batch_size=4", "precision=fp32"])
    assert warm.returncode == 0, warm.stderr[-3000:]
    model = tmp_path / "warm" / "tiny" / "sft" / "model"
    one, w1 = _sft_step(tmp_path / "one", model, 1, 4, 0)
    two, w2 = _sft_step(tmp_path / "two", model, 2, 2, 29533, backend)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    assert_same_update(w1, w2)


@pytest.mark.parametrize("backend", PARITY)
def test_two_ranks_take_the_ppo_update_one_rank_takes_on_the_same_rollouts(tmp_path, tiny_model_dir, backend):
    """One PPO iteration from the same SFT and RM: 1 rank x 4 rollouts against 2 ranks x 2. Near-greedy
    decoding (top_p 1e-6) makes the rollouts the same on both sides, so the advantages (whitened over
    all ranks' tokens), the token-weighted losses and the update must be the same too."""
    import shutil

    base = tmp_path / "base"
    proc = rlhf(["run", "configs/tiny.yaml", "--stages", "sft,reward", f"runs_root={base}", "precision=fp32"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    common = ["--stages", "ppo", "precision=fp32", "ppo.iterations=1", "ppo.top_p=1e-6", "ppo.ppo_epochs=1",
              "ppo.max_new_tokens=12"]
    out = {}
    for name, procs, batch in (("one", 1, 4), ("two", 2, 2)):
        shutil.copytree(base, tmp_path / name)
        args = ["run", "configs/tiny.yaml", *common, f"runs_root={tmp_path / name}", f"ppo.batch_size={batch}",
                f"ppo.mini_batch_size={batch}"]
        if procs > 1:
            args += [f"launch.num_processes={procs}", *BACKENDS[backend], "launch.main_process_port=29535"]
        proc = rlhf(args)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        run = tmp_path / name / "tiny" / "ppo"
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        out[name] = (next(r for r in rows if "kl" in r), weights(run / "model"))
    (one, w1), (two, w2) = out["one"], out["two"]
    for key in ("score_raw_mean", "kl", "value_loss", "policy_loss", "grad_norm_policy"):
        assert two[key] == pytest.approx(one[key], rel=1e-3, abs=1e-5), key
    assert_same_update(w1, w2)


def test_generation_with_the_weights_gathered_once_gives_the_tokens_of_per_step_gathering(tiny_model_dir):
    """bench/bench_fsdp_generate.py on 2 FSDP2 ranks: greedy generation inside PPO's
    `gathered_for_generation` (one all-gather per rollout) must produce exactly the tokens that plain
    generation on the sharded model produces (all-gathers every step); the bench asserts it. Its
    timings are a benchmark, not checked here (bench/RESULTS.md)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           "configs/accelerate/cpu_fsdp2.yaml", "--main_process_port", "29537",
                           "--num_cpu_threads_per_process", "1", "-m", "bench.bench_fsdp_generate",
                           "--model", "tiny-random-llama", "--repeats", "1", "--new-tokens", "8"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (row["backend"], row["world_size"]) == ("fsdp2", 2)
