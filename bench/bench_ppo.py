"""PPO: our stage (stages.ppo.run) against trl 1.12.0's PPOTrainer (trl.experimental.ppo, the last
TRL release that ships PPO), same models, prompts, batch, response length, epochs and minibatches.

    bench/setup_peer_venv.sh                          # once: the trl-1.12 venv at bench/.venv-trl112
    python -m bench.bench_ppo                         # CPU, fp32, B=8, R=32, 2 epochs x 2 minibatches, 1+3 iterations
    python -m bench.bench_ppo --sides ours            # no peer venv needed
    python -m bench.bench_ppo --device cuda --dtype bf16

Roles on both sides: policy and reference = SmolLM2-135M-Instruct; reward model and value model =
a 1-label AutoModelForSequenceClassification built from it (seeded random score head, saved once,
reward_stats {mean 0, std 1} so our normalisation is the identity). Sampling at T=1 (top-k 0,
top-p 1), stop at EOS, missing-EOS penalty 1, k1 KL with beta 0.05, gamma 1, lambda 0.95, clip 0.2,
value clip 0.2, vf_coef 0.1, lr 1e-5, fp32, no gradient checkpointing, no sample generations, no
saving during the timed iterations. The peer runs in its own venv and imports nothing of ours
except bench/benchlib.py (standard library only).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench import benchlib as bl

SECTION = "ppo"
LABELS = {"ours": "ours: stages.ppo", "peer": "trl 1.12.0 PPOTrainer"}
PHASES = ("generate", "score", "train")


# ---- shared inputs ----

def prepare_reward_model(model_path: str, root: Path) -> Path:
    """A 1-label sequence classifier from the causal LM (seeded head) + reward_stats.json; cached."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = root / (Path(model_path).name + "-rm1")
    if (out / "model.safetensors").exists():
        return out
    tok = AutoTokenizer.from_pretrained(model_path)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)
    rm.config.pad_token_id = tok.pad_token_id
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=root))
    rm.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0}))
    os.replace(tmp, out)
    return out


def _link_dir(src: Path, dst: Path) -> None:
    """dst/ as a real folder of per-file links to src/ (a stage replacing dst never touches the cache)."""
    dst.mkdir(parents=True)
    for f in Path(src).iterdir():
        (dst / f.name).symlink_to(f.resolve())


# ---- workers (run in their own process) ----

def worker_ours(job: dict) -> dict:
    from stages import ppo

    def link_inputs(run_dir: Path) -> None:
        _link_dir(Path(job["model_path"]), run_dir / "sft" / "model")
        _link_dir(Path(job["rm_path"]), run_dir / "reward" / "model")

    # An iteration's first metrics row (the one with iteration_s) is logged when it ends.
    phases = []
    res = bl.time_stage(ppo.run, job, {"ppo": dict(
        prompts={"source": job["prompts"]}, iterations=job["iterations"], batch_size=job["batch_size"],
        mini_batch_size=job["mini_batch_size"], ppo_epochs=job["ppo_epochs"], max_new_tokens=job["response_length"],
        lr=1e-5, temperature=1.0, top_p=1.0, kl_coef=0.05, kl_estimator="k1", gamma=1.0, lam=0.95, cliprange=0.2,
        cliprange_value=0.2, vf_coef=0.1, missing_eos_penalty=1.0, save_every=job["iterations"] + 1)},
        "iteration_s", prefix="bench-ppo-ours-", prepare=link_inputs, on_row=lambda m: phases.append(
            {k: m[f"{k}_s"] for k in PHASES} | {"response_length": m.get("response_length"),
                                                 "skipped": m.get("skipped_minibatches", 0)}))
    return res | {"phases": phases}


class _PhaseTimer:
    """Wall time per phase of trl's PPO loop, by wrapping its module-level helpers and optimizer.

    generate: batch_generation; score: no-grad forward/get_reward calls (ref, value, reward);
    train: the rest of the iteration (grad forward, backward, optimizer, GAE, logging)."""

    def __init__(self):
        self.totals = {"generate": 0.0, "score": 0.0}
        self.depth = 0

    def wrap(self, module, name: str, phase):
        import torch

        fn = getattr(module, name)

        def timed(*a, **k):
            which = phase() if callable(phase) else phase
            if which is None or self.depth:
                return fn(*a, **k)
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.totals[which] += time.perf_counter() - t0
                self.depth -= 1

        setattr(module, name, timed)


def worker_peer(job: dict) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    bl.set_threads(job)
    timer = _PhaseTimer()
    timer.wrap(trl_ppo, "batch_generation", "generate")
    no_grad_only = lambda: None if torch.is_grad_enabled() else "score"  # noqa: E731
    timer.wrap(trl_ppo, "forward", no_grad_only)
    timer.wrap(trl_ppo, "get_reward", no_grad_only)
    stamps, phases = [], []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(bl.clock())
            phases.append(dict(timer.totals))

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(job["model_path"])
    tok.padding_side = "left"
    rows = [json.loads(line) for line in Path(job["prompts"]).read_text().splitlines()]
    texts = [tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True) for r in rows]
    ds = datasets.Dataset.from_list([{"input_ids": tok(t, add_special_tokens=False)["input_ids"]} for t in texts])
    load = dict(dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(job["model_path"], **load)
    ref = AutoModelForCausalLM.from_pretrained(job["model_path"], **load)
    reward = AutoModelForSequenceClassification.from_pretrained(job["rm_path"], num_labels=1, **load)
    value = AutoModelForSequenceClassification.from_pretrained(job["rm_path"], num_labels=1, **load)
    B = job["batch_size"]
    args = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-ppo-trl-"), per_device_train_batch_size=B,
        gradient_accumulation_steps=1, num_mini_batches=B // job["mini_batch_size"], num_ppo_epochs=job["ppo_epochs"],
        total_episodes=B * job["iterations"], response_length=job["response_length"], temperature=1.0,
        stop_token="eos", missing_eos_penalty=1.0, kl_coef=0.05, kl_estimator="k1", gamma=1.0, lam=0.95,
        cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, whiten_rewards=False, learning_rate=1e-5,
        local_rollout_forward_batch_size=B, num_sample_generations=0, gradient_checkpointing=False,
        bf16=job["dtype"] == "bf16", fp16=False, use_cpu=job["device"] == "cpu", logging_steps=1,
        save_strategy="no", report_to="none", seed=0, dataloader_num_workers=0,
    )
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=ds, eval_dataset=ds, callbacks=[Stamp()])
    trainer.train()
    # cumulative phase totals -> per-iteration times (train = the remainder of the iteration)
    per_iter, prev_t, prev = [], None, {"generate": 0.0, "score": 0.0}
    for (t, _), tot in zip(stamps, phases):
        d = {k: tot[k] - prev[k] for k in prev}
        if prev_t is not None:
            d["train"] = (t - prev_t) - d["generate"] - d["score"]
        per_iter.append(d)
        prev_t, prev = t, tot
    return {"stamps": stamps, "phases": per_iter, "wall_s": time.perf_counter() - t0}


# ---- parent ----

def phase_table(res: dict, warmup: int, labels: dict) -> str:
    """Mean seconds per timed iteration in each phase, per side."""
    rows = []
    for side, label in labels.items():
        if side not in res:
            continue
        timed = res[side]["phases"][max(1, warmup):]
        if not timed:
            continue
        mean = {k: sum(p.get(k) or 0.0 for p in timed) / len(timed) for k in PHASES}
        total = sum(mean.values())
        rows.append([label] + [f"{mean[k]:.2f} ({100 * mean[k] / total:.0f}%)" for k in PHASES] + [total])
    return bl.markdown_table(["side", "generate s", "score s (ref, value, reward fwd)",
                              "train s (ppo epochs; rest of iteration)", "sum s"], rows)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bl.add_common_args(ap)
    ap.add_argument("--iterations", type=int, default=3, help="timed PPO iterations")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first iterations")
    ap.add_argument("--batch-size", type=int, default=8, help="rollouts per iteration")
    ap.add_argument("--mini-batch-size", type=int, default=4)
    ap.add_argument("--ppo-epochs", type=int, default=2)
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--sides", default="ours,peer", help="comma list: ours, peer")
    ap.add_argument("--peer-python", default=str(bl.PEER_VENV / "bin" / "python"),
                    help="the trl-1.12 venv's python (bench/setup_peer_venv.sh builds it)")
    args = ap.parse_args(argv)
    sides = args.sides.split(",")
    if "peer" in sides and not any(r.startswith("peer=") for r in args.reuse) and not Path(args.peer_python).exists():
        raise SystemExit(f"error: the PPO peer needs trl 1.12.0 in {args.peer_python}: run bench/setup_peer_venv.sh "
                         "(or pass --sides ours)")

    from bench import benchdata
    from stages.modeling.loading import load_tokenizer

    b = bl.Setup(args, LABELS, SECTION)
    labels, basis, logs, info, ceiling, model_path = b.labels, b.basis, b.logs, b.info, b.ceiling, b.model_path
    n_params = bl.count_params(model_path)
    cache = Path(model_path).parent.parent / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    rm_path = prepare_reward_model(model_path, cache)
    total = args.iterations + args.warmup
    data = benchdata.prompts(logs, args.batch_size * total, load_tokenizer(args.model))
    job = {"model": args.model, "model_path": model_path, "rm_path": str(rm_path), "prompts": data["path"],
           "iterations": total, "batch_size": args.batch_size, "mini_batch_size": args.mini_batch_size,
           "ppo_epochs": args.ppo_epochs, "response_length": args.response_length, "device": args.device,
           "dtype": args.dtype, "threads": args.threads, "ours_set": args.ours_set}
    res, note = b.run_sides("bench.bench_ppo", job, peer_python=args.peer_python)
    # Useful model FLOPs per rollout token, the same on both sides: generation and the reference forward
    # (2·N_lm each), value and reward forwards (2·N_cls each), then ppo_epochs x policy and value training
    # (6·N_lm + 6·N_cls). Our stage skips the LM head on prompt positions; that saving is not counted.
    seq = data["prompt_tokens"] + args.response_length
    n_cls = bl.count_params(model_path, head="score")
    flops_per_token = 2 * n_params * 2 + 2 * n_cls * 2 + args.ppo_epochs * 6 * (n_params + n_cls)
    table, per_side = bl.side_by_side(res, labels, warmup=args.warmup, samples_per_step=args.batch_size,
                                      tokens_per_sample=seq, flops_per_token=flops_per_token,
                                      ceiling=ceiling, basis=basis, unit="rollouts")
    phases = phase_table(res, args.warmup, labels)
    skipped = sum(p.get("skipped", 0) for p in res.get("ours", {}).get("phases", [])[args.warmup:])
    if skipped:
        phases += (f"\n\n**Not equal work:** our stage skipped {skipped} minibatches in the timed iterations "
                   f"(spike-guard rollback); rerun.")
    if args.ours_set:
        phases += ("\n\nMFU counts the equal-settings FLOPs on both rows; with LoRA our stage does less work "
                   "(no weight gradients for the frozen base), so read its MFU as an equivalent-work rate.")
    print(table, phases, sep="\n\n")
    body = (f"{bl.machine_line(info)}\n\nSmolLM2-135M as policy, reference, reward and value model, {args.dtype}, B={args.batch_size} rollouts of {args.response_length} "
            f"new tokens (mean prompt {data['prompt_tokens']:.0f} tokens), {args.ppo_epochs} PPO epochs × "
            f"{args.batch_size // args.mini_batch_size} minibatches, {args.warmup} warm-up + {args.iterations} timed "
            f"iterations. s/step = median time between consecutive iteration ends (wall and process CPU); tokens "
            f"count prompt + {args.response_length} response positions per rollout. {bl.basis_note(basis, ceiling)} "
            f"MFU = model FLOPs/s ÷ ceiling, with {flops_per_token / 1e9:.2f} GFLOP per rollout token: "
            f"generate + reference forward 2·2·N_lm, value + reward forwards 2·2·N_cls, {args.ppo_epochs} epochs × "
            f"6·(N_lm + N_cls) training (N_lm {n_params / 1e6:.1f} M, N_cls {n_cls / 1e6:.1f} M). Peak RSS is each side's own process (VmHWM). "
            f"Logs: `{logs}`.\n\n{note}{table}\n\nWhere an iteration's wall time goes (mean of the timed iterations; ours from "
            f"the stage's own generate_s/score_s/train_s metrics, trl's by wrapping batch_generation and its no-grad "
            f"forward/get_reward calls):\n\n{phases}\n")
    b.publish(res, "PPO: stages.ppo vs trl 1.12.0 PPOTrainer", body)
    return {"per_side": per_side}


if __name__ == "__main__":
    import sys

    if "--worker" in sys.argv:
        bl.worker_main({"ours": worker_ours, "peer": worker_peer})
    else:
        main()
