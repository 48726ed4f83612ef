"""The schema of each stage's config section, what each stage reads outside its own section
(`stage_inputs`), and the one hash of a config (`config_hash`). Light on purpose: no torch import,
so a config is validated before any model loads. `pipeline.config` composes these into the full
run config."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from data_schemas.spec import DatasetSpec

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = "smollm2-135m-instruct"  # the embedded default (stages/modeling/loading.py provisions it)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)  # lr=inf is a typo, never a setting


class LoRAConfig(Section):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class GuardConfig(Section):
    """Loss-spike guard shared by every stage (see README, "Reliability")."""

    enabled: bool = True
    spike_factor: float = Field(4.0, gt=1, description="spike if loss > factor x running median")
    window: int = Field(20, ge=3, description="running-median window, in steps")
    min_history: int = Field(5, ge=1, description="steps seen before spikes are judged")
    snapshot_every: int = Field(10, ge=1, description="SFT/RM: steps between in-memory good snapshots "
                                "(PPO rolls back to its last checkpoint on disk instead)")
    skip_batches: int = Field(10, ge=0, description="batches skipped after a rollback")
    max_events: int = Field(5, ge=1, description="give up after this many spikes")
    max_kl: float = Field(50.0, gt=0, description="PPO: spike if mean KL (nats) exceeds this")
    max_ratio: float = Field(10.0, gt=1, description="PPO: spike if the max policy ratio exceeds this")


class TrainLoop(Section):
    """Settings every training stage shares."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1, description="optimizer steps; -1 = derive from epochs")
    batch_size: int = Field(8, ge=1, description="per device")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-5, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    max_length: int = Field(512, ge=16)
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    save_steps: int = Field(0, ge=0, description="checkpoint every N steps for resume; 0 = end only")
    logging_steps: int = Field(1, ge=1)
    eval_steps: int = Field(0, ge=0, description="evaluate every N steps; 0 = at the end only")
    lora: LoRAConfig = Field(default_factory=LoRAConfig)

    @field_validator("max_steps")
    @classmethod
    def _max_steps_not_zero(cls, v: int) -> int:
        if v == 0:
            raise ValueError("0 would train nothing; use -1 to derive the steps from epochs, or a positive count")
        return v


class SFTConfig(TrainLoop):
    data: DatasetSpec = Field(default_factory=lambda: DatasetSpec(source="default:demonstrations"))
    packing: bool = Field(False, description="bin whole examples into rows of max_length tokens (fewer, fuller steps)")
    padding_free: bool = Field(True, description="concatenate a batch into one row with per-sequence positions: "
                               "no compute on padding (1.1-1.2x faster than padded here)")
    merge_lora: bool = Field(True, description="also export a merged full model when LoRA is on")


class RewardConfig(TrainLoop):
    data: DatasetSpec = Field(default_factory=lambda: DatasetSpec(source="default:preferences"))
    eval_data: DatasetSpec | None = Field(None, description="a preference dataset to evaluate on instead of a "
                                          "random eval_fraction of `data` (all of `data` then trains)")
    init_from: str = Field("sft", description="'sft' (this run's SFT model) or any model path/name")
    lr: float = Field(1e-5, gt=0)
    use_margin: bool = Field(True, description="subtract a pair's margin inside the sigmoid")
    padding_free: bool = Field(True, description="lay each group out as its prompt once, then each reply, packed "
                               "into rows with a mask: no compute on padding or on repeated prompts (same rewards "
                               "and gradients as padded batches)")
    freeze_layers: int = Field(0, ge=0, description="freeze the embeddings and the lowest N transformer layers: "
                               "backward stops above them (cheaper steps; the upper layers and the score head learn)")

    @model_validator(mode="after")
    def _freeze_or_lora(self):
        if self.freeze_layers and self.lora.enabled:
            raise ValueError("freeze_layers and lora.enabled are two ways to train part of the model; pick one")
        return self


class MonitorConfig(Section):
    """PPO's over-optimisation monitor (stages/rl/monitor.py)."""

    every: int = Field(0, ge=0, description="score the held-out prompts every N iterations and before the first; "
                       "0 = off")
    prompts: DatasetSpec = Field(default_factory=lambda: DatasetSpec(source="default:eval_prompts", limit=32),
                                 description="held-out prompts, answered with PPO's own sampling settings")
    judges: list[str] = Field(default_factory=list, description="reward models PPO does not optimise (paths/names); "
                              "the policy the first one scores best is kept in ppo/best/")
    batch_size: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _judges_need_evaluations(self):
        if self.judges and not self.every:
            raise ValueError("judges are scored only when the monitor runs: set every > 0")
        return self


class PPOConfig(Section):
    prompts: DatasetSpec = Field(default_factory=lambda: DatasetSpec(source="default:prompts"))
    policy: str = Field("sft", description="'sft' or a model path/name")
    reward_model: str = Field("reward", description="'reward' or a reward-model path/name")
    value_init: str = Field("reward", description="'reward' (InstructGPT), 'policy', or a path")
    reward_fn: str | None = Field(None, description="'module:function' programmatic reward instead of the RM")
    iterations: int = Field(10, ge=1)
    batch_size: int = Field(8, ge=1, description="rollouts per iteration, per device")
    samples_per_prompt: int = Field(1, ge=1, description="responses sampled per prompt in an iteration (a group); "
                                    "batch_size / samples_per_prompt prompts are drawn")
    advantage: Literal["gae", "group"] = Field("gae", description="'gae': GAE over the value model's estimates "
                                               "(InstructGPT); 'group': each response's score minus the mean of "
                                               "its group's other responses (RLOO), no value model")
    mini_batch_size: int = Field(4, ge=1)
    ppo_epochs: int = Field(2, ge=1)
    lr: float = Field(1e-5, gt=0)
    value_lr: float | None = Field(None, gt=0)
    grad_clip: float = Field(1.0, gt=0)
    max_prompt_length: int = Field(256, ge=8)
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    kl_coef: float = Field(0.05, ge=0, description="beta; the initial value when adaptive")
    adaptive_kl: bool = False
    kl_target: float = Field(6.0, gt=0)
    kl_horizon: int = Field(10000, ge=1)
    kl_estimator: Literal["k1", "k3"] = "k1"
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    whiten_advantages: bool = True
    reward_normalize: bool = Field(True, description="use the RM's saved mean/std")
    reward_clip: float | None = Field(5.0, gt=0)
    missing_eos_penalty: float | None = Field(1.0, ge=0)
    ptx_coef: float = Field(0.0, ge=0, description="gamma_ptx; >0 mixes in the SFT LM loss")
    ema_decay: float | None = Field(None, gt=0, lt=1)
    save_every: int = Field(5, ge=1)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    value_lora: LoRAConfig = Field(default_factory=LoRAConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)

    @model_validator(mode="after")
    def _minibatch_divides(self):
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"mini_batch_size ({self.mini_batch_size}) must divide batch_size ({self.batch_size})")
        if self.batch_size % self.samples_per_prompt:
            raise ValueError(f"samples_per_prompt ({self.samples_per_prompt}) must divide batch_size ({self.batch_size})")
        if self.advantage == "group" and self.samples_per_prompt < 2:
            raise ValueError("advantage 'group' needs samples_per_prompt >= 2 (each response's baseline is the "
                             "mean score of the other responses to its prompt)")
        if self.advantage == "group" and self.value_lora.enabled:
            raise ValueError("value_lora adapts the value model, which advantage 'group' does not have; "
                             "turn one of them off")
        return self


class Decoding(Section):
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.7, ge=0, description="0 = greedy")
    top_p: float = Field(0.9, gt=0, le=1)
    batch_size: int = Field(8, ge=1)


class BaselineConfig(Section):
    model: str | None = Field(None, description="defaults to the run's `model:`")
    prompt_file: str = "configs/prompts/dialogue_prompted.txt"
    user_prefix: str = "User:"
    assistant_prefix: str = "Assistant:"
    decoding: Decoding = Field(default_factory=Decoding)


class CompareConfig(Section):
    prompts: DatasetSpec = Field(default_factory=lambda: DatasetSpec(source="default:eval_prompts"))
    samples_per_prompt: int = Field(1, ge=1, description="responses per prompt and model. More than 1 narrows "
                                    "the intervals: win rates pair each model's j-th response to a prompt, and the "
                                    "bootstrap resamples prompts with all their responses")
    models: list[str] = Field(default_factory=lambda: ["baseline", "sft", "ppo"], min_length=1)
    judges: list[str] = Field(default_factory=lambda: ["reward"], min_length=1,
                              description="reward models that score every response: 'reward' (this run's RM) or any "
                              "reward-model path/name. The report leads with one that PPO did not optimise")
    human_labels: str | None = Field(None, description="an `rlhf label` labels file: human win rates and each "
                                     "judge's agreement with the people")
    best_of_n: int = Field(0, ge=0, description="N >= 2 adds the model best_of_N: N samples of the SFT model per "
                           "prompt, the one PPO's reward model scores highest (the reference point RL should beat)")

    @model_validator(mode="after")
    def _best_of_n(self):
        if self.best_of_n == 1:
            raise ValueError("best_of_n: 1 is the SFT model itself; use 0 (off) or N >= 2")
        return self
    reference: str | None = Field("sft", description="KL reference for tuned models; null = skip KL")
    decoding: Decoding = Field(default_factory=Decoding)
    bootstrap: int = Field(1000, ge=0, description="resamples over prompts for win-rate intervals; 0 = none")
    tie_epsilon: float = Field(1e-6, ge=0, description="RM scores closer than this are a tie")
    report_samples: int = Field(20, ge=0, description="prompts shown side by side in the report")


class RunConfig(Section):
    """Run-level settings plus one section per stage."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$",
                      description="the run folder under runs_root: letters, digits, _ . -, not starting with . or -")
    model: str = DEFAULT_MODEL
    runs_root: str = "runs"
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 mixed precision where the device does bf16 natively, else fp32 "
        "(see stages/core/runtime.py)")
    trust_remote_code: bool = False
    sft: SFTConfig = Field(default_factory=SFTConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)

    @classmethod
    def from_resolved(cls, data: dict) -> "RunConfig":
        """Read a resolved run config that may carry pipeline-only keys (e.g. `launch`)."""
        return cls.model_validate({k: v for k, v in data.items() if k in cls.model_fields})


# ---- what each stage reads outside its own section: declared here, once ----

class StageInputs(NamedTuple):
    """A stage's inputs besides its own section, the run-level keys and `guard`. The stages read these
    values from here, and the orchestrator hashes exactly these to decide what must run again.

    models:   model references; one that names a stage ('sft', 'reward', 'ppo', 'baseline') is that
              stage's output, so that stage is upstream
    settings: other sections' settings, by dotted key
    files:    files whose content is an input, by the setting that names them (resolved as
              `resolve_config_path` does)
    """

    models: tuple[str | None, ...]
    settings: dict[str, Any]
    files: dict[str, Path]


def stage_inputs(cfg: RunConfig, stage: str) -> StageInputs:
    if stage == "sft":
        return StageInputs(models=(), settings={}, files={})
    if stage == "reward":
        return StageInputs(models=(cfg.reward.init_from,), settings={}, files={})
    if stage == "ppo":
        p = cfg.ppo
        # PPO-ptx mixes in the SFT loss on the SFT demonstrations, cut as SFT cut them.
        ptx = {"sft.data": cfg.sft.data, "sft.max_length": cfg.sft.max_length} if p.ptx_coef > 0 else {}
        return StageInputs(models=(p.policy, p.reward_model, p.value_init, *p.monitor.judges), settings=ptx, files={})
    if stage == "baseline":  # the baseline answers the prompts compare judges
        return StageInputs(models=(), settings={"compare.prompts": cfg.compare.prompts,
                                                "compare.samples_per_prompt": cfg.compare.samples_per_prompt},
                           files={"baseline.prompt_file": resolve_config_path(cfg.baseline.prompt_file)})
    if stage == "compare":
        # 'baseline' among compare.models is the baseline stage's output: its settings and prompt file
        # come in through that stage. The RM scores rows cut as the reward stage cut them.
        c = cfg.compare
        # Which judge PPO optimised is read from the ppo section.
        labels = ({"compare.human_labels": resolve_config_path(c.human_labels)} if c.human_labels else {})
        return StageInputs(models=(*c.models, *c.judges, c.reference, *(("sft",) if c.best_of_n else ())),
                           settings={"reward.max_length": cfg.reward.max_length, "ppo.reward_model": cfg.ppo.reward_model,
                                     "ppo.reward_fn": cfg.ppo.reward_fn}, files=labels)
    raise ValueError(f"unknown stage {stage!r}")


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A relative file path in a config is tried against the current directory, then the repo root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def config_hash(obj) -> str:
    """The one hash of config values: sha256 of their sorted-key JSON, 16 hex digits."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
