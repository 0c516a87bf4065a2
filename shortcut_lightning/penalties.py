"""The one seam through which callbacks add loss terms.

A callback cannot change the loss Lightning backpropagates, and a second ``backward()`` inside a
callback is never all-reduced under DDP. So the LightningModule asks its trainer's callbacks for
penalty terms and adds them to its own loss: one loss, one backward, correct under AMP and DDP.

A module of yours gets the same with one line in ``training_step``::

    loss = F.cross_entropy(logits, y) + total_penalty(self, batch, {"logits": logits})
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from torch import Tensor


@runtime_checkable
class PenaltyProvider(Protocol):
    """A callback that contributes a loss term for the current training batch.

    Return ``None`` when the term is inactive (e.g. before the stage's ``start_epoch``). The term is
    logged as ``train/penalty/<penalty_name>`` (the class name when there is no such attribute).
    """

    def training_penalty(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, outputs: dict[str, Tensor]
    ) -> Tensor | None: ...


def total_penalty(
    pl_module: L.LightningModule, batch: Any, outputs: dict[str, Tensor] | None = None
) -> Tensor:
    """Sum of the penalties of the trainer's callbacks for this batch, each logged under its name."""
    outputs = outputs or {}
    total = torch.zeros((), device=pl_module.device)
    trainer = pl_module._trainer
    if trainer is None:
        return total
    seen: dict[str, int] = {}
    for callback in trainer.callbacks:
        if not isinstance(callback, PenaltyProvider):
            continue
        term = callback.training_penalty(trainer, pl_module, batch, outputs)
        if term is None:
            continue
        name = getattr(callback, "penalty_name", type(callback).__name__)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}_{seen[name]}"
        pl_module.log(f"train/penalty/{name}", term.detach(), on_step=True, on_epoch=True)
        total = total + term
    return total
