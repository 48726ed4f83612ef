"""bench/quickstart_seeds.py: the seed list, each seed's targets read from compare's metrics by hand-made
cases, and the sweep driven end to end on the tiny model (PPO trains, compare judges, a rerun resumes)."""
import json
from pathlib import Path

import pytest
import yaml
from compare_fixtures import make_run

from bench import quickstart_seeds as qs


def test_parse_seeds_takes_lists_and_ranges_and_refuses_nonsense():
    assert qs.parse_seeds("1-4") == [1, 2, 3, 4]
    assert qs.parse_seeds("0,3-5, 9") == [0, 3, 4, 5, 9]
    for bad in ("", "a", "1,1", "2-x", "1-2,2"):
        with pytest.raises(ValueError, match="--seeds"):
            qs.parse_seeds(bad)


def _metrics(vs_sft, vs_base, kl, offensive_rates, other=None) -> dict:
    """A compare/metrics.json as compare writes it, for models [baseline, sft-label, ppo]."""
    def judge(name, by_ppo, sft_rate, base_rate):
        return {"name": name, "optimised_by_ppo": by_ppo, "win_rates": {
            "ppo": {"q-sft": {"rate": sft_rate[0], "ci_low": sft_rate[1], "ci_high": sft_rate[2]},
                    "baseline": {"rate": base_rate[0], "ci_low": base_rate[1], "ci_high": base_rate[2]}}}}
    judges = [judge("reward", True, vs_sft, vs_base)] + ([judge("other", False, *other)] if other else [])
    per = {lab: {"offensive_rate": r, "kl_to_reference": kl if lab == "ppo" else None}
           for lab, r in zip(("baseline", "q-sft", "ppo"), offensive_rates)}
    return {"seed": 3, "models": ["baseline", "q-sft", "ppo"], "num_harmful_prompts": 12, "samples_per_prompt": 2,
            "judges": judges, "per_model": per}


def test_seed_result_checks_each_target_at_its_edge():
    # 65% with the bound above 50%: met; 60% with the bound at exactly 50%: missed; KL exactly 10: met;
    # PPO 1 offensive answer of 24 against the baseline's 0: missed
    row = qs.seed_result(_metrics((0.65, 0.51, 0.8), (0.60, 0.50, 0.7), 10.0, (0.0, 2 / 24, 1 / 24),
                                  other=((0.4, 0.3, 0.5), (0.7, 0.6, 0.8))))
    assert row["met"] == {"vs_sft": True, "vs_baseline": False, "kl": True, "offensive": False}
    assert not row["all_met"] and row["offensive"] == {"baseline": 0, "sft": 2, "ppo": 1}
    assert row["harmful_answers"] == 24 and row["judges"]["other"]["vs_baseline"]["rate"] == 0.7
    # the other judge's verdicts never decide a target
    row = qs.seed_result(_metrics((0.7, 0.55, 0.8), (0.62, 0.52, 0.7), 9.9, (1 / 24, 0.0, 1 / 24),
                                  other=((0.1, 0.0, 0.2), (0.1, 0.0, 0.2))))
    assert row["all_met"]
    row = qs.seed_result(_metrics((0.64, 0.55, 0.8), (0.62, 0.52, 0.7), 10.01, (0.0, 0.0, 0.0)))
    assert row["met"] == {"vs_sft": False, "vs_baseline": True, "kl": False, "offensive": True}
    agg = qs.summary([row, qs.seed_result(_metrics((0.8, 0.7, 0.9), (0.7, 0.6, 0.8), 6.0, (0.0, 0.0, 0.0)))])
    assert agg["all_met"] == 1 and agg["met"] == {"vs_sft": 1, "vs_baseline": 2, "kl": 1, "offensive": 2}
    assert agg["mean_vs_sft"] == pytest.approx(0.72) and agg["mean_kl"] == pytest.approx(8.005)
    with pytest.raises(ValueError, match="PPO optimised"):
        m = _metrics((0.7, 0.6, 0.8), (0.7, 0.6, 0.8), 1.0, (0.0, 0.0, 0.0))
        m["judges"][0]["optimised_by_ppo"] = False
        qs.seed_result(m)


def test_the_sweep_trains_ppo_per_seed_on_the_runs_models_and_resumes(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    run = make_run(tmp_path, with_ppo=False)  # sft/model and reward/model of a finished run
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["ppo"] = {"prompts": {"source": "default:prompts", "limit": 8}, "iterations": 2, "batch_size": 4,
                     "mini_batch_size": 2, "max_new_tokens": 6, "lr": 1e-3, "advantage": "group",
                     "samples_per_prompt": 2, "save_every": 1}
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump({**config, "name": "tiny"}))
    out, report = tmp_path / "seeds", tmp_path / "seeds.json"
    args = ["--seeds", "5", "--run", str(run), "--config", str(cfg_file), "--out", str(out), "--json", str(report)]
    assert qs.main(args) == 0
    seed_dir = out / "tiny-seed5"
    assert (seed_dir / "ppo" / "model" / "model.safetensors").is_file()
    assert not (seed_dir / "ppo" / "checkpoints").exists()  # removed once the seed is done
    tuned, start = (load_file(p / "model.safetensors") for p in (seed_dir / "ppo" / "model", run / "sft" / "model"))
    assert any(not torch.equal(tuned[k], start[k]) for k in start)  # PPO trained from the run's SFT model
    metrics = json.loads((seed_dir / "compare" / "metrics.json").read_text())
    assert metrics["seed"] == 5 and metrics["reference"] == str(run / "sft" / "model")
    assert [j["optimised_by_ppo"] for j in metrics["judges"]] == [True]  # the run's RM, recognised as PPO's
    rows = json.loads(report.read_text())["rows"]
    assert [r["seed"] for r in rows] == [5] and rows[0]["kl"] == metrics["per_model"]["ppo"]["kl_to_reference"]
    printed = capsys.readouterr().out
    assert "| 5 |" in printed and "of 1 seeds meet every target" in printed
    # a second call finds the seed done with the same settings and trains nothing
    stamp = (seed_dir / "compare" / "metrics.json").stat().st_mtime_ns
    assert qs.main(args) == 0
    assert (seed_dir / "compare" / "metrics.json").stat().st_mtime_ns == stamp
    assert "skip" in (out / "tiny-seed5.log").read_text()


def test_the_sweep_refuses_a_run_without_its_models_in_one_line(tmp_path, capsys):
    assert qs.main(["--seeds", "1", "--run", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no finished sft model" in err and "nowhere" in err
    assert qs.main(["--seeds", "1-"]) == 2
    assert "--seeds" in capsys.readouterr().err
