"""BatchNorm statistics: held at a model's own while something else trains, or re-estimated over a split.

Why re-estimate: a network fine-tuned with augmentation keeps running statistics of *augmented* batches
(random crops, flips), averaged with momentum over the last steps; its test images are not augmented.
Re-estimating them over the training images with evaluation transforms removes that mismatch, without
training (the train/test discrepancy of Touvron et al. 2019, "Fixing the train-test resolution
discrepancy"). Pruning (PruSC) changes the statistics too: channels lose inputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, SequentialSampler
from tqdm.auto import tqdm

from shortcut_lightning.probing.model_parts import evaluating


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def hold_batchnorm(model: nn.Module) -> None:
    """Every BatchNorm of ``model`` in eval mode: it normalises with its running statistics and keeps them."""
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.eval()


class _Moments:
    """Per-channel count, sum and sum of squares (float64) of one BatchNorm's inputs over a pass."""

    def __init__(self, layer: _BatchNorm) -> None:
        self.sums: Tensor | None = None
        self.handle = layer.register_forward_pre_hook(self._add)

    def _add(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        x = inputs[0].detach().double().transpose(0, 1).flatten(1)  # channels x (batch * positions)
        found = torch.stack([torch.full_like(x[:, 0], x.shape[1]), x.sum(1), (x * x).sum(1)])
        self.sums = found if self.sums is None else self.sums + found


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: Iterable[Any], desc: str, show: bool = True) -> int:
    """Re-estimates every BatchNorm's running mean and variance over ``loader``; returns the images seen.

    One pass with the BatchNorm layers normalising by batch statistics (every other module in eval mode:
    no dropout, no drop-path), as ``torch.optim.swa_utils.update_bn`` does. Unlike a cumulative average
    of batch statistics, each layer's estimate is the exact mean and (unbiased) variance of all its inputs
    of the pass: the first layer's result does not depend on the batch size (deeper layers see inputs
    normalised by batch statistics, as in training, so theirs do, slightly). Under DDP give every rank
    the whole split (:func:`whole_split`): each computes the one-process result, so the ranks agree by
    construction at the cost of one redundant forward pass per rank. Modes and hooks are restored
    whatever happens.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    moments = [_Moments(layer) for layer in layers]
    images = 0
    device = next(model.parameters()).device
    try:
        with evaluating(model):
            for layer in layers:
                layer.train()
            for batch in tqdm(loader, desc=desc, leave=False, disable=not show):
                model(batch["image"].to(device))
                images += len(batch["image"])
    finally:
        for m in moments:
            m.handle.remove()
    for layer, m in zip(layers, moments, strict=True):
        if m.sums is None:  # a layer the forward never reached (a branch unused by this model)
            continue
        count, total, squares = m.sums
        mean = total / count
        variance = (squares - count * mean * mean) / (count - 1).clamp(min=1)
        layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
        layer.running_var.copy_(variance.clamp(min=0).to(layer.running_var.dtype))
    return images


def whole_split(dm: Any, split: str) -> DataLoader:
    """A loader over every sample of ``split`` in order, on every DDP rank alike (evaluation transforms)."""
    return dm.dataloader(split, sampler=SequentialSampler(dm.dataset(split)))
