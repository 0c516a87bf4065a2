"""Callbacks used by tests; module-level so DDP spawn and subprocesses can import them."""

from __future__ import annotations

import os
import signal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class SquaredLogitPenalty(Callback):
    """A penalty provider for the seam test: weight * mean squared logit."""

    penalty_name = "probe"

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = weight

    def training_penalty(self, trainer, pl_module, batch, outputs):
        return self.weight * outputs["logits"].pow(2).mean()


class GradCapture(Callback):
    """Keeps the head's gradient after the first backward."""

    def __init__(self) -> None:
        self.grad = None

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.grad is None:
            self.grad = pl_module.head.weight.grad.detach().clone()


class KillAt(Callback):
    """SIGKILLs its own process at a given epoch and batch: a crash with no chance to clean up."""

    def __init__(self, epoch: int = 1, batch: int = 2) -> None:
        self.epoch = epoch
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


def head_norm(model: torch.nn.Module) -> float:
    return float(model.head.weight.norm())
