"""Samplers that are deterministic per (seed, epoch) and shard themselves across DDP ranks.

They subclass ``DistributedSampler`` so Lightning uses them as they are (it wraps any other sampler),
and Lightning's ``set_epoch`` call makes a resumed run draw the same batches as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from shortcut_lightning.errors import DataError

SAMPLERS = ("default", "class_balanced", "group_balanced")


def world() -> tuple[int, int]:
    """(number of processes, this process's rank); (1, 0) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class BalancedSampler(DistributedSampler):
    """Shuffles (``default``) or draws with replacement so every class or group is equally likely.

    Args:
        targets: class label per sample.
        groups: group label per sample.
        mode: ``default`` | ``class_balanced`` | ``group_balanced``.
        seed: base seed; the permutation of epoch ``e`` depends on ``(seed, e)`` only.
        subset: draw only these sample positions (default: all).
        weights: per-sample draw weights over the whole split, in place of ``mode``'s (a stage's, e.g.
            MaskPruning's cluster balance); see :meth:`reweight`.
        repeats: per-sample counts over the whole split, in place of ``mode``'s: an epoch is a shuffle of
            the split with sample ``i`` in it ``repeats[i]`` times (JTT's upsampled set), so its length is
            their sum.
    """

    def __init__(
        self,
        targets: torch.Tensor,
        groups: torch.Tensor,
        mode: str = "default",
        seed: int = 0,
        subset: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        repeats: torch.Tensor | None = None,
    ) -> None:
        if mode not in SAMPLERS:
            raise DataError(f"sampler {mode!r} is unknown: choose one of {', '.join(SAMPLERS)}")
        self.positions = None if subset is None else torch.as_tensor(subset, dtype=torch.long)
        if self.positions is not None:
            targets, groups = targets[self.positions], groups[self.positions]
        replicas, rank = world()
        super().__init__(range(len(targets)), num_replicas=replicas, rank=rank, shuffle=True, seed=seed)
        self.mode = mode
        labels = {"class_balanced": targets, "group_balanced": groups}.get(mode)
        self.weights = None
        if labels is not None:
            counts = torch.bincount(labels).double()
            self.weights = 1.0 / counts[labels]
        if weights is not None:
            self.reweight(weights)
        self.multiset = None  # sample positions, each as often as its repeat count
        if repeats is not None:
            repeats = torch.as_tensor(repeats, dtype=torch.long)
            if self.positions is not None:
                repeats = repeats[self.positions]
            self.multiset = torch.repeat_interleave(torch.arange(len(repeats)), repeats)
            self.num_samples = -(-len(self.multiset) // self.num_replicas)
            self.total_size = self.num_samples * self.num_replicas

    def reweight(self, weights: torch.Tensor) -> None:
        """Draws with replacement by these per-sample weights over the whole split, from the next epoch's order on.

        With worker processes, a DataLoader draws an epoch's order when its iterator starts, which for the
        first epoch of a fit is before ``on_train_epoch_start``: a stage that balances from that epoch
        passes the weights to the datamodule (:meth:`~shortcut_lightning.data.base.GroupDataModule.train_on`) before the loader is built.
        """
        weights = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = weights if self.positions is None else weights[self.positions]

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        n = len(self.dataset)
        if self.multiset is not None:
            n = len(self.multiset)
            order = self.multiset[torch.randperm(n, generator=g)]
        elif self.weights is None:
            order = torch.randperm(n, generator=g)
        else:
            order = torch.multinomial(self.weights, n, replacement=True, generator=g)
        if self.positions is not None:
            order = self.positions[order]
        order = order.tolist()
        order += order[: self.total_size - n]
        return iter(order[self.rank : self.total_size : self.num_replicas])


class EvalShardSampler(DistributedSampler):
    """In-order evaluation shards without the padding repeats of ``DistributedSampler``.

    Every sample is seen exactly once across ranks, so summed metric states are exact under DDP.
    Ranks may hold one batch more or less; nothing in our evaluation steps synchronises per batch.
    """

    def __init__(self, n: int) -> None:
        replicas, rank = world()
        super().__init__(range(n), num_replicas=replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(self.rank, n, self.num_replicas))
        self.total_size = n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples
