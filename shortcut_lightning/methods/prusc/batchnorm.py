"""BatchNorm around pruning: held at the dense model's statistics while masks learn, re-estimated after."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm


def hold_batchnorm(model: nn.Module) -> None:
    """Every BatchNorm of ``model`` in eval mode: it normalises with its running statistics and keeps them."""
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.eval()


@torch.no_grad()
def recalibrate_batchnorm(
    trainer: L.Trainer, model: L.LightningModule, loader: Iterable[Any], desc: str
) -> None:
    """Re-estimates every BatchNorm's statistics over ``loader`` (a cumulative average, then averaged over ranks)."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return
    was_training = model.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the pass
    model.train()
    for batch in tqdm(loader, desc=desc, leave=False, disable=not trainer.is_global_zero):
        model(batch["image"].to(model.device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
        if trainer.world_size > 1:
            m.running_mean.copy_(trainer.strategy.reduce(m.running_mean, reduce_op="mean"))
            m.running_var.copy_(trainer.strategy.reduce(m.running_var, reduce_op="mean"))
    model.train(was_training)
