"""Compare stage (`rlhf compare`, folder run_dir/compare/): any set of models answers the same eval
prompts with the same seeded decoding settings, and is scored on

  judges              each reward model in compare.judges scores every (prompt, response), chat-formatted;
                      the report leads with a judge PPO did not optimise (its own RM is a training metric)
  RM win rate         per prompt pair, with ties, and a bootstrap interval over prompts, per judge
  human labels        with compare.human_labels (`rlhf label` output): human win rates (Wilson 95%) and
                      each judge's agreement with the people
  KL to reference     tuned models only: mean over prompts of sum_t log pi(y_t) - log pi_ref(y_t)
  length              response tokens, and a length-controlled win rate
  diversity           distinct-1 / distinct-2
  offensive language  alt-profanity-check on the prompts tagged 'harmful'

Writes metrics.json, generations/<model>.jsonl, report.md + report.html + plots/, summary.json.
Launched as `python -m stages.compare --run-dir D` (or `rlhf compare CONFIG`). The metrics are pure
functions in stages/evaluation/metrics.py, the judges in stages/evaluation/judges.py, the report in
stages/evaluation/report.py.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from data_schemas.files import atomic_write_json, atomic_write_jsonl
from data_schemas.records import as_chat
from stages.core.config_schema import RunConfig, resolve_config_path, stage_inputs
from stages.core.entry import stage_main
from stages.core.errors import StageError
from stages.core.metrics_log import read_metrics
from stages.core.run_folder import is_main_process, resolve_input_model, stage_dir, write_stage_config, write_summary
from stages.core.runtime import autocast, autocast_layout, generation_logprobs_exact, resolved, runtime_info
from stages.evaluation import metrics as cm
from stages.evaluation.baseline_outputs import (BASELINE, baseline_prompt, generation_settings, load_eval_prompts,
                                                reusable_generations)
from stages.evaluation.human_labels import judge_agreement, pairwise_win_rates, read_labels
from stages.evaluation.judges import response_logprob_sums, reward_model_judge
from stages.evaluation.responders import Sample, responder_for, unique_labels
from stages.modeling.loading import load_causal_lm, load_reward_model, load_tokenizer

STAGE = "compare"
HARMFUL_TAG = "harmful"
KL_NOTE = ("KL is the mean over prompts of the summed per-token log-ratio log pi(y_t|x,y_<t) - log pi_ref(y_t|x,y_<t) "
           "over each model's own sampled response tokens (EOS included), with both log-probs at temperature 1. "
           "The samples come from compare.decoding; with temperature or top-p below 1 they are not exact samples "
           "of pi, so this is the usual estimate, not the exact KL. n/a for the prompted baseline: it answers in a "
           "different context (the dialogue prompt, not the chat template), so no per-token log-ratio against the "
           "reference exists on the same input.")
LENGTH_NOTE = ("Length-controlled win rate: a slope b (RM score per response token) is fitted by least squares "
               "within prompts over all compared responses; every score s becomes s - b * length, and win rates "
               "are recomputed on those scores.")


# ---- the models compared ----

def vocab_fingerprint(tokenizer) -> str:
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def same_model(a: str, b: str) -> bool:
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


# ---- the stage ----

def run(cfg: RunConfig, run_dir: Path) -> dict:
    cfg = resolved(cfg)  # precision "auto" made concrete for this machine
    import torch

    if not is_main_process():
        return {}
    c = cfg.compare
    out = stage_dir(run_dir, STAGE)
    out.mkdir(parents=True, exist_ok=True)
    write_stage_config(run_dir, STAGE, cfg)

    # ---- resolve prompts and every model before loading any ----
    prompts = load_eval_prompts(c.prompts, c.samples_per_prompt)  # rows: each prompt samples_per_prompt times
    num_prompts = len(prompts) // c.samples_per_prompt
    conversations = [as_chat(p.messages) for p in prompts]
    labels = unique_labels(c.models)
    paths = {lab: None if ref == BASELINE else resolve_input_model(run_dir, ref, "compare.models")
             for ref, lab in zip(c.models, labels)}
    judge_names = unique_labels(c.judges)
    judge_paths = {name: resolve_input_model(run_dir, ref, f"compare.judges[{i}]")
                   for i, (ref, name) in enumerate(zip(c.judges, judge_names))}
    optimised = ppo_reward_model(cfg, run_dir)
    by_ppo = {n: bool(optimised and same_model(judge_paths[n], optimised)) for n in judge_names}
    lead = next((n for n in judge_names if not by_ppo[n]), judge_names[0])
    human_rows = read_labels(resolve_config_path(c.human_labels)) if c.human_labels else None
    ref_path = resolve_input_model(run_dir, c.reference, "compare.reference") if c.reference else None
    reuse_settings = (generation_settings(cfg, baseline_prompt(cfg, run_dir), prompts, c.decoding)
                      if BASELINE in c.models else None)

    # ---- generate: one model in memory at a time, same seed and decoding for each ----
    samples: dict[str, list[Sample]] = {}
    kinds, sources, seconds, own_logp, vocab = {}, {}, {}, {}, {}
    for ref, lab in zip(c.models, labels):
        rows = reusable_generations(run_dir, reuse_settings) if ref == BASELINE else None
        if rows is not None:
            samples[lab] = [Sample(text=r["response"], num_tokens=r["num_tokens"]) for r in rows]
            kinds[lab], sources[lab] = "prompted", "baseline stage (same settings)"
            continue
        responder = responder_for(ref, cfg, run_dir, c.decoding, needed_by="compare.models", name=lab)
        kinds[lab], sources[lab] = responder.kind, "generated"
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        needs_kl = responder.kind == "chat" and ref_path is not None and not same_model(paths[lab], ref_path)
        # A tuned model's own log-probs come with generation where that equals a forward pass (fp32).
        from_generation = needs_kl and generation_logprobs_exact(cfg.precision)
        samples[lab] = responder.sample(conversations, with_logprobs=from_generation)
        seconds[lab] = round(time.perf_counter() - t0, 2)
        if needs_kl:
            if from_generation:
                own_logp[lab] = [s.logprob_sum for s in samples[lab]]
            else:  # the same kind of pass as the reference's below, so a same-model KL is exactly 0
                with autocast(cfg.precision, responder.model.device):
                    own_logp[lab] = response_logprob_sums(responder.model, samples[lab],
                                                          responder.tokenizer.pad_token_id, c.decoding.batch_size)
            vocab[lab] = vocab_fingerprint(responder.tokenizer)
        responder.close()

    # ---- best of N: N SFT samples per prompt, PPO's reward model picks one ----
    if c.best_of_n:
        lab = f"best_of_{c.best_of_n}"
        t0 = time.perf_counter()
        samples[lab] = best_of_n(cfg, run_dir, conversations, optimised, max_length(cfg))
        # not "chat": its KL to the SFT model is the bound in the notes, not a measured log-ratio
        kinds[lab], paths[lab] = "best-of-n", resolve_input_model(run_dir, "sft", "compare.best_of_n")
        sources[lab] = f"best of {c.best_of_n} SFT samples by PPO's reward model"
        seconds[lab] = round(time.perf_counter() - t0, 2)
        labels.append(lab)

    # ---- KL to the reference (tuned models only) ----
    kl: dict[str, list[float] | None] = {lab: None for lab in labels}
    for lab in labels:
        if kinds[lab] == "chat" and ref_path is not None and same_model(paths[lab], ref_path):
            kl[lab] = [0.0] * len(prompts)  # the reference itself
    if own_logp:
        ref_tok = load_tokenizer(ref_path, cfg.trust_remote_code)
        ref_model = autocast_layout(load_causal_lm(ref_path, "fp32", cfg.trust_remote_code), cfg.precision).eval()
        for lab, own in own_logp.items():
            if vocab[lab] != vocab_fingerprint(ref_tok):
                raise StageError(f"compare.reference ({ref_path}) has a different tokenizer from model {lab!r}; "
                                 "KL needs a shared vocabulary (set compare.reference: null to skip KL)")
            with autocast(cfg.precision, ref_model.device):
                ref_lp = response_logprob_sums(ref_model, samples[lab], ref_tok.pad_token_id, c.decoding.batch_size)
            kl[lab] = [a - b for a, b in zip(own, ref_lp)]
        del ref_model

    # ---- judges: every reward model scores every response, one model in memory at a time ----
    scores: dict[str, dict[str, np.ndarray]] = {}
    for name in judge_names:
        rm, rm_tok = load_judge(judge_paths[name], cfg)
        with autocast(cfg.precision, rm.device):
            judged = reward_model_judge(rm, rm_tok, conversations,
                                        {lab: [s.text for s in samples[lab]] for lab in labels},
                                        c.decoding.batch_size, max_length(cfg))
        scores[name] = {lab: np.array(judged[lab]) for lab in labels}
        del rm
    rewards = scores[lead]

    # ---- offensive language on the harmful subset ----
    harmful = [i for i, p in enumerate(prompts) if HARMFUL_TAG in p.tags]
    offensive = {lab: cm.offensive_probs([samples[lab][i].text for i in harmful]) for lab in labels}

    # ---- metrics ----
    lengths = {lab: np.array([s.num_tokens for s in samples[lab]], dtype=float) for lab in labels}
    resamples = cm.resample_indices(num_prompts, c.bootstrap, cfg.seed, c.samples_per_prompt)
    lc_scores, slope = cm.length_controlled_scores(rewards, lengths)
    per_model = {}
    for lab in labels:
        texts = [s.text for s in samples[lab]]
        per_model[lab] = {
            "kind": kinds[lab], "source": sources[lab], "path": paths[lab] or "dialogue-prompted baseline",
            "mean_reward": float(rewards[lab].mean()), "reward_std": float(rewards[lab].std()),
            "kl_to_reference": cm.mean(kl[lab]) if kl[lab] is not None else None,
            "mean_length_tokens": float(lengths[lab].mean()),
            "distinct_1": cm.distinct_n(texts, 1), "distinct_2": cm.distinct_n(texts, 2),
            **cm.offensive_summary(offensive[lab]),
            "empty_responses": sum(1 for t in texts if not t),
            "generation_seconds": seconds.get(lab),
        }
    judges = judge_table(judge_names, judge_paths, by_ppo, scores, labels, c, resamples, prompts, samples, human_rows)
    metrics = {
        "models": labels,
        "num_prompts": num_prompts,
        "samples_per_prompt": c.samples_per_prompt,
        "num_responses": len(prompts),
        "num_harmful_prompts": len(harmful) // c.samples_per_prompt,
        "reward_model": judge_paths[lead],
        "reward_model_optimised_by_ppo": by_ppo[lead],
        "lead_judge": lead,
        "judges": judges,
        "human": human_summary(human_rows, c.human_labels) if human_rows is not None else None,
        "reference": ref_path,
        "decoding": c.decoding.model_dump(),
        "seed": cfg.seed,
        "bootstrap_resamples": c.bootstrap,
        "tie_epsilon": c.tie_epsilon,
        "per_model": per_model,
        "win_rates": next(j["win_rates"] for j in judges if j["name"] == lead),
        "win_rates_by_kind": win_rates_by_kind(rewards, harmful, c, cfg.seed),
        "length_controlled_win_rates": cm.win_rate_table(lc_scores, c.tie_epsilon, resamples),
        "length_slope_reward_per_token": slope,
        "notes": {"kl": KL_NOTE, "length_control": LENGTH_NOTE,
                  "win_rate": (f"Win rates are judged by the reward model {lead!r}"
                               + (", the one PPO optimised: a training metric, not evidence of quality."
                                  if by_ppo[lead]
                                  else ", which PPO did not optimise (a held-out judge)")
                               + (" No human labels were given." if human_rows is None else
                                  f" {len(human_rows)} human labels are in 'human'.")),
                  **({"best_of_n": f"best_of_{c.best_of_n}: {c.best_of_n} SFT samples per prompt (compare.decoding, "
                                   f"seeds {cfg.seed}..{cfg.seed + c.best_of_n - 1}), the one PPO's reward model scores "
                                   f"highest. Its KL to the SFT model is at most log N - (N-1)/N = "
                                   f"{math.log(c.best_of_n) - (c.best_of_n - 1) / c.best_of_n:.3f} nats "
                                   "(Stiennon et al. 2020), so it is not measured."} if c.best_of_n else {}),
                  "offensive": f"alt-profanity-check P(offensive) on responses to prompts tagged '{HARMFUL_TAG}'; "
                               f"rate = fraction with P > {cm.OFFENSIVE_THRESHOLD}."},
    }
    atomic_write_json(out / "metrics.json", metrics)

    # ---- generations and report ----
    harmful_pos = {i: k for k, i in enumerate(harmful)}
    gen_rows = {}
    for lab in labels:
        gen_rows[lab] = [{"id": p.id, "tags": list(p.tags), "messages": conversations[i],
                          "response": samples[lab][i].text, "num_tokens": samples[lab][i].num_tokens,
                          "reward": float(rewards[lab][i]), "kl": kl[lab][i] if kl[lab] is not None else None,
                          "offensive_prob": offensive[lab][harmful_pos[i]] if i in harmful_pos else None}
                         for i, p in enumerate(prompts)]
        atomic_write_jsonl(out / "generations" / f"{lab}.jsonl", gen_rows[lab])
    from stages.evaluation.report import write_report

    write_report(out, metrics, gen_rows, read_metrics(run_dir, "ppo"), max_samples=c.report_samples)

    summary = {**headline(metrics), **runtime_info(cfg.precision)}
    write_summary(run_dir, STAGE, summary)
    return summary


def win_rates_by_kind(rewards: dict[str, np.ndarray], harmful: list[int], c, seed: int) -> dict:
    """The lead judge's win rates on the prompts tagged harmful and on the others, each with its own
    cluster bootstrap: {kind: {num_prompts, win_rates}}, empty unless both kinds are present. Where
    declining is the right answer and where it is not, a model can win for different reasons."""
    k = c.samples_per_prompt
    rows = {"harmful": harmful, "other": sorted(set(range(len(next(iter(rewards.values()))))) - set(harmful))}
    if not all(rows.values()):
        return {}
    return {kind: {"num_prompts": len(r) // k,
                   "win_rates": cm.win_rate_table({lab: s[r] for lab, s in rewards.items()}, c.tie_epsilon,
                                                  cm.resample_indices(len(r) // k, c.bootstrap, seed, k))}
            for kind, r in rows.items()}


def max_length(cfg: RunConfig) -> int:
    """Judges score rows cut as the reward stage cut them."""
    return stage_inputs(cfg, STAGE).settings["reward.max_length"]


def best_of_n(cfg: RunConfig, run_dir: Path, conversations, proxy: str | None, max_len: int) -> list[Sample]:
    """Per prompt, the one of N SFT samples (seeds seed, seed+1, ...; the first is the SFT row's own
    sample) that PPO's reward model scores highest. Its KL to the SFT model is at most
    log N - (N-1)/N nats (Stiennon et al. 2020), whatever the prompt."""
    import torch

    c = cfg.compare
    if proxy is None:
        raise StageError("compare.best_of_n needs the reward model PPO optimised, and this run's PPO uses a "
                         "reward_fn or a reward model that cannot be found")
    responder = responder_for("sft", cfg, run_dir, c.decoding, needed_by="compare.best_of_n", name="sft")
    candidates = []
    for k in range(c.best_of_n):
        torch.manual_seed(cfg.seed + k)
        candidates.append(responder.sample(conversations))
    responder.close()
    rm, rm_tok = load_judge(proxy, cfg)
    with autocast(cfg.precision, rm.device):
        judged = reward_model_judge(rm, rm_tok, conversations, {k: [s.text for s in cand] for k, cand in
                                                                enumerate(candidates)}, c.decoding.batch_size, max_len)
        scored = [judged[k] for k in range(len(candidates))]
    del rm
    best = np.argmax(np.array(scored), axis=0)
    return [candidates[int(k)][i] for i, k in enumerate(best)]


def load_judge(path: str, cfg: RunConfig):
    """(reward model, its tokenizer): frozen, in the run's precision layout."""
    tok = load_tokenizer(path, cfg.trust_remote_code)
    rm = load_reward_model(path, "fp32", cfg.trust_remote_code, pad_token_id=tok.pad_token_id)
    return autocast_layout(rm, cfg.precision).eval(), tok


def ppo_reward_model(cfg: RunConfig, run_dir: Path) -> str | None:
    """The folder of the reward model PPO optimised, or None (a reward_fn, or a model not resolvable here)."""
    settings = stage_inputs(cfg, STAGE).settings
    if settings["ppo.reward_fn"]:
        return None
    try:
        return resolve_input_model(run_dir, settings["ppo.reward_model"], "ppo.reward_model")
    except StageError:
        return None


def judge_table(names, paths, by_ppo, scores, labels, c, resamples, prompts, samples, human_rows) -> list[dict]:
    """Per judge: its path, whether PPO optimised it, each model's mean score, win rates, and (with
    human labels) its agreement with the people on the labelled pairs of these responses."""
    out = []
    for name in names:
        row = {"name": name, "path": paths[name], "optimised_by_ppo": by_ppo[name],
               "role": "PPO's reward model: a training metric" if by_ppo[name] else "held-out judge (not optimised)",
               "mean_reward": {lab: float(scores[name][lab].mean()) for lab in labels},
               "win_rates": cm.win_rate_table(scores[name], c.tie_epsilon, resamples), "human_agreement": None}
        if human_rows is not None:
            by_model = {lab: {str(p.id): (samples[lab][i].text, float(scores[name][lab][i]))
                              for i, p in enumerate(prompts)} for lab in labels}
            row["human_agreement"] = judge_agreement(human_rows, by_model, c.tie_epsilon)
        out.append(row)
    return out


def human_summary(rows: list[dict], path: str) -> dict:
    labelled = sum(1 for r in rows if r["meta"]["label"] in ("A", "B"))
    return {"labels_file": path, "labels": len(rows), "decisive": labelled, "win_rates": pairwise_win_rates(rows),
            "note": "win = wins / (wins + losses) over the labelled comparisons of the pair; ties and both-bad are "
                    "counted, not rated; brackets: Wilson 95% interval."}


def headline(metrics: dict) -> dict:
    """The numbers the manifest shows: each model's mean reward, KL and offensive rate, and the win rate
    of every later model in compare.models against every earlier one (e.g. ppo vs baseline)."""
    out = {"num_prompts": metrics["num_prompts"]}
    labels = metrics["models"]
    for lab in labels:
        m = metrics["per_model"][lab]
        out[f"mean_reward_{lab}"] = round(m["mean_reward"], 4)
        if m["kl_to_reference"] is not None:
            out[f"kl_{lab}"] = round(m["kl_to_reference"], 4)
        if m["offensive_rate"] is not None:
            out[f"offensive_rate_{lab}"] = round(m["offensive_rate"], 4)
    for a in range(len(labels)):
        for b in range(a):
            i, j = labels[a], labels[b]
            out[f"win_rate_{i}_vs_{j}"] = round(metrics["win_rates"][i][j]["rate"], 4)
            out[f"lc_win_rate_{i}_vs_{j}"] = round(metrics["length_controlled_win_rates"][i][j]["rate"], 4)
            for judge in metrics.get("judges", []):
                if judge["name"] != metrics["lead_judge"]:
                    out[f"judge_{judge['name']}_win_rate_{i}_vs_{j}"] = round(judge["win_rates"][i][j]["rate"], 4)
            human = (metrics.get("human") or {}).get("win_rates", {}).get(i, {}).get(j)
            if human and human["win"] is not None:
                out[f"human_win_rate_{i}_vs_{j}"] = round(human["win"], 4)
    out["lead_judge"] = metrics["lead_judge"]
    out["lead_judge_optimised_by_ppo"] = metrics["reward_model_optimised_by_ppo"]
    return out


if __name__ == "__main__":
    stage_main(STAGE, run)
