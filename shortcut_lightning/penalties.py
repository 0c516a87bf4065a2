"""The seam through which callbacks shape the training loss: penalty terms, and per-sample weights.

A callback cannot change the loss Lightning backpropagates, and a second ``backward()`` inside a
callback is never all-reduced under DDP. So the LightningModule asks its trainer's callbacks for
penalty terms and adds them to its own loss: one loss, one backward, correct under AMP and DDP.

A module of yours gets the same with one line in ``training_step``::

    loss = F.cross_entropy(logits, y) + total_penalty(self, batch, {"logits": logits})

A reweighted loss (GroupDRO) is not a term added to the mean: it replaces the mean of the per-sample
losses by a weighted sum. A :class:`LossWeighting` callback supplies the weights; the module asks for them
through :func:`weighted_loss` (two more lines)::

    losses = F.cross_entropy(logits, y, reduction="none")
    loss = weighted_loss(self, batch, losses) + total_penalty(self, batch, {"logits": logits})
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from torch import Tensor

from shortcut_lightning.errors import ShortcutError


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


@runtime_checkable
class LossWeighting(Protocol):
    """A callback that weights the per-sample training losses of a batch (GroupDRO's group weights).

    Return weights [N] (the loss is then ``sum(weights * losses)``) or ``None`` to leave the plain mean.
    Under DDP each rank returns the weights of its own shard, scaled so that the mean over ranks that DDP
    takes of the gradients is the gradient of the loss over the whole global batch.
    """

    def sample_weights(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, losses: Tensor
    ) -> Tensor | None: ...


def loss_weighting(pl_module: L.LightningModule) -> LossWeighting | None:
    """The trainer's :class:`LossWeighting` callback (at most one may weight the loss), or ``None``."""
    trainer = pl_module._trainer
    found = [] if trainer is None else [cb for cb in trainer.callbacks if isinstance(cb, LossWeighting)]
    if len(found) > 1:
        names = ", ".join(type(cb).__name__ for cb in found)
        raise ShortcutError(f"more than one callback weights the training loss ({names}): keep one")
    return found[0] if found else None


def weighted_loss(
    pl_module: L.LightningModule, batch: Any, losses: Tensor, weighting: LossWeighting | None = None
) -> Tensor:
    """The batch's training loss from its per-sample ``losses`` [N]: the mean, or the weighted sum the
    trainer's :class:`LossWeighting` callback asks for. ``weighting``: that callback when the caller has
    already found it with :func:`loss_weighting` (saves a second scan of the callbacks per step)."""
    callback = weighting if weighting is not None else loss_weighting(pl_module)
    weights = (
        None if callback is None else callback.sample_weights(pl_module._trainer, pl_module, batch, losses)
    )
    return losses.mean() if weights is None else (weights.to(losses.dtype) * losses).sum()
