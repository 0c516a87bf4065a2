"""``FiniteLoss``: a NaN or infinite training loss stops the fit at once, naming the step and the likely fixes."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from shortcut_lightning.errors import ModelError


class FiniteLoss(Callback):
    """Stops ``fit`` before the backward of the first loss that is NaN or infinite, on every DDP rank alike.

    Why: nothing else notices. ``argmax`` sends NaN logits to class 0, so validation accuracy still looks
    plausible, and a stage that starts later consumes NaN embeddings (DFR then fails inside scikit-learn,
    k-means puts every sample in one cluster). Checked in ``on_before_backward``, so the weights never take
    the step and the last checkpoint is the model before the epoch that failed.

    Cost: one read of the loss on the host per step (a device sync), and under DDP one all-reduce of a
    flag, so that a NaN on one rank stops every rank instead of leaving the others waiting in the gradient
    all-reduce. The ``shortcut`` CLI always adds it (``finite_loss``); for a module of yours add it yourself.

    Example::

        trainer = L.Trainer(max_epochs=3, callbacks=[FiniteLoss()])
        trainer.fit(ShortcutClassifier("resnet18"), datamodule=SyntheticShortcuts())

    Args:
        check: turn the check off (``False``) to save the per-step sync when you trust the run.
    """

    def __init__(self, check: bool = True) -> None:
        self.check = check

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        if not self.check:
            return
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:  # every rank stops together, or none does
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise ModelError(self.message(trainer, loss))

    @staticmethod
    def message(trainer: L.Trainer, loss: Tensor) -> str:
        """The one line a user reads: what, where, and what to try."""
        local = loss.detach().float()
        value = str(float(local.flatten()[0])) if not bool(torch.isfinite(local).all()) else "finite here"
        where = " on another DDP rank" if value == "finite here" else ""
        return (
            f"the training loss is not finite ({value}){where} at epoch {trainer.current_epoch}, global step "
            f"{trainer.global_step}, batch {trainer.fit_loop.epoch_loop.batch_idx} of the epoch: lower the learning "
            "rate (model.optimizer.init_args.lr), train in full precision (trainer.precision: 32-true), or check "
            "the data for broken images; the last checkpoint holds the model before this epoch"
        )
