"""Which items a training step sees: the seeded train/eval split, packing examples into rows, and
the deterministic data stream that the SFT/RM loop and PPO's prompt batches read.

Data stream: epoch e is a seeded permutation of the training items; the epochs are concatenated
into one stream and micro-batch m takes the next `batch_size * world_size` items of it (rank r
its own slice). The data position is therefore one integer (the micro-batch cursor), which a
checkpoint stores; resuming replays nothing and skips nothing.
"""
from __future__ import annotations

import math
import random
from functools import lru_cache

import torch

from stages.core.config_schema import TrainLoop


def split_items(n: int, eval_fraction: float, seed: int, keys: list | None = None) -> tuple[list[int], list[int]]:
    """Seeded train/eval split of n items. With `keys`, items sharing a key (e.g. the same
    prompt) land on the same side, so the eval split never sees a training prompt."""
    keys = list(range(n)) if keys is None else keys
    uniq = list(dict.fromkeys(keys))
    random.Random(seed).shuffle(uniq)
    n_eval = min(len(uniq) - 1, round(len(uniq) * eval_fraction)) if eval_fraction > 0 else 0
    if eval_fraction > 0 and len(uniq) >= 2:
        n_eval = max(1, n_eval)
    eval_keys = set(uniq[:n_eval])
    train = [i for i in range(n) if keys[i] not in eval_keys]
    evals = [i for i in range(n) if keys[i] in eval_keys]
    return train, evals


def total_steps(tc: TrainLoop, n_train: int, world: int) -> int:
    if tc.max_steps > 0:
        return tc.max_steps
    per_step = tc.batch_size * tc.grad_accum * world
    return max(1, math.ceil(tc.epochs * n_train / per_step))


@lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def micro_batch_indices(n: int, seed: int, cursor: int, batch_size: int, world: int, rank: int) -> list[int]:
    """Item indices of global micro-batch `cursor` for this rank (see the module docstring)."""
    start = cursor * batch_size * world + rank * batch_size
    return [epoch_order(n, seed, pos // n)[pos % n] for pos in range(start, start + batch_size)]


def eval_shard(items: list[int], accelerator) -> list[int]:
    """This rank's share of the eval items (every world_size-th one)."""
    return items[accelerator.process_index::accelerator.num_processes]


def chunks(seq: list, size: int):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]
