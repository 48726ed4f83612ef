"""Resume checkpoints, one module for every training stage: SFT and the RM (`step-N/`, written by
the training loop) and PPO (`iter-N/`).

A checkpoint folder holds
  <name>.safetensors  the trainable parameters of each model (PPO: policy, value, EMA weights)
  <name>.pt           optimizer (and scheduler) states
  rng.pt              every rank's torch, Python (and CUDA) generators: a resumed run draws the same numbers
  <state file>        the loop's position and the config fingerprint
It is written to a staging folder and moved into place, so a folder that exists is complete; only
the last KEEP_CHECKPOINTS are kept. A resume refuses checkpoints made under another config
(`config_fingerprint`), except for the fields a resume may change (`Layout.resumable`).
"""
from __future__ import annotations

import json
import random
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from data_schemas.files import atomic_replace_dir, atomic_write_json, staging_dir
from stages.core.config_schema import RunConfig, config_hash
from stages.core.errors import StageError
from stages.core.sharding import (
    copy_full_into,
    full_tensors,
    is_dtensor,
    load_optimizer_state_full,
    optimizer_state_full,
)
from stages.modeling.trainable import trainable_params

KEEP_CHECKPOINTS = 2


@dataclass(frozen=True)
class Layout:
    """prefix: folder name before the number. state_file: written last; a folder counts once it exists.
    resumable: fields of the stage's section that may change between a run and its resume."""

    prefix: str
    state_file: str
    resumable: tuple[str, ...]


TRAIN_LOOP = Layout("step-", "trainer_state.json", ("max_steps", "epochs", "save_steps", "logging_steps", "eval_steps"))
PPO = Layout("iter-", "state.json", ("iterations", "save_every"))


def config_fingerprint(cfg: RunConfig, stage: str, layout: Layout) -> str:
    """Hash of everything that shapes a stage's training, minus the fields a resume may change."""
    section = getattr(cfg, stage).model_dump(mode="json")
    for k in layout.resumable:
        section.pop(k, None)
    return config_hash({"model": cfg.model, "seed": cfg.seed, "precision": cfg.precision, stage: section})


def list_checkpoints(root: Path, layout: Layout) -> list[tuple[int, Path]]:
    """(number, folder) of the complete checkpoints under root, oldest first. Staging folders start
    with "." and never match."""
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        if d.name.startswith(layout.prefix) and (d / layout.state_file).exists():
            try:
                out.append((int(d.name[len(layout.prefix):]), d))
            except ValueError:
                continue
    return sorted(out)


@contextmanager
def reading_checkpoint(path: Path):
    """Any failure to read a checkpoint (truncated safetensors, bad JSON, a missing file) becomes one
    line that names it and says what to do."""
    try:
        yield
    except StageError:
        raise
    except Exception as e:  # safetensors, torch.load and json each raise their own types
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise StageError(f"checkpoint {path} is unreadable ({type(e).__name__}: {detail}); delete that folder "
                         f"to resume from the one before it, or delete {path.parent} to start over") from None


def resume_checkpoint(root: Path, layout: Layout, fingerprint: str, stage: str) -> tuple[int, Path] | None:
    """(number, folder) of the checkpoint to resume from (the last one), or None for a fresh start.
    Checkpoints made with another config are an error, not something to skip silently."""
    ckpts = list_checkpoints(root, layout)
    if not ckpts:
        return None
    number, path = ckpts[-1]
    with reading_checkpoint(path):
        saved = json.loads((path / layout.state_file).read_text()).get("fingerprint")
    if saved != fingerprint:
        raise StageError(f"the checkpoints in {root} were made with a different {stage} config; "
                         "delete that folder to start over, or restore the config to resume")
    return number, path


# ---- random generators, per rank ----

def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- save, load ----

def _named(source) -> dict[str, torch.Tensor]:
    """A module's trainable parameters, or a plain dict of tensors (EMA weights)."""
    return trainable_params(source) if isinstance(source, torch.nn.Module) else source


def _state_dict(obj):
    """An optimizer's (whole, if sharded) or scheduler's state, or a dict of them."""
    if isinstance(obj, dict):
        return {k: _state_dict(o) for k, o in obj.items()}
    return optimizer_state_full(obj) if hasattr(obj, "param_groups") else obj.state_dict()


def _load_state_dict(obj, saved) -> None:
    if hasattr(obj, "param_groups"):
        load_optimizer_state_full(obj, saved)
    else:
        obj.load_state_dict(saved)


def save_checkpoint(accelerator, root: Path, number: int, layout: Layout, *, weights: dict, states: dict,
                    state: dict) -> None:
    """Write `<prefix><number>/` (see the module docstring). Every rank calls it (each hands in its
    generators); rank 0 alone writes. weights: name -> module (its trainable parameters) or dict of
    tensors; states: name -> optimizer/scheduler, or a dict of them."""
    from accelerate.utils import gather_object

    rngs = gather_object([rng_state()])
    # Sharded (FSDP2) weights are gathered whole, which every rank takes part in; otherwise rank 0 alone reads them.
    sharded = any(is_dtensor(t) for source in weights.values() for t in _named(source).values())
    if sharded or accelerator.is_main_process:
        tensors = {name: full_tensors(_named(source)) for name, source in weights.items()}
        saved_states = {name: _state_dict(obj) for name, obj in states.items()}
    if accelerator.is_main_process:
        from safetensors.torch import save_file

        final = root / f"{layout.prefix}{number}"
        tmp = staging_dir(final)
        for name, t in tensors.items():
            save_file(t, str(tmp / f"{name}.safetensors"))
        for name, state_dict in saved_states.items():
            torch.save(state_dict, tmp / f"{name}.pt")
        torch.save({"ranks": rngs}, tmp / "rng.pt")
        atomic_write_json(tmp / layout.state_file, state)
        atomic_replace_dir(tmp, final)
        for _, old in list_checkpoints(root, layout)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_trainable(module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy saved trainable parameters into `module`; they must match its trainable parameters exactly."""
    own = trainable_params(module)
    missing, unknown = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unknown:
        which = f"missing parameter {missing[0]}" if missing else f"unknown parameter {unknown[0]}"
        raise StageError(f"checkpoint {path} does not match the model ({which}); "
                         f"delete {path.parent} to start over")
    for n, p in own.items():
        copy_full_into(p, tensors[n])


def load_checkpoint(path: Path, layout: Layout, *, weights: dict, states: dict, rank: int | None) -> dict:
    """Restore what save_checkpoint wrote into `weights` (modules) and `states` (optimizers,
    schedulers, or dicts of them), and with a `rank` that rank's generators; returns the state file.
    Loads are weights_only."""
    from safetensors.torch import load_file

    for name, module in weights.items():
        load_trainable(module, load_file(str(path / f"{name}.safetensors")), path)
    for name, obj in states.items():
        saved = torch.load(path / f"{name}.pt", weights_only=True, map_location="cpu")
        for k, o in (obj.items() if isinstance(obj, dict) else [(None, obj)]):
            _load_state_dict(o, saved if k is None else saved[k])
    if rank is not None:
        ranks = torch.load(path / "rng.pt", weights_only=True)["ranks"]
        if rank < len(ranks):
            set_rng_state(ranks[rank])
    return json.loads((path / layout.state_file).read_text())
