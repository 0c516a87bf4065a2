"""``PartialFinetuning``: fine-tune only the last stages of a pretrained backbone (Lightning's ``BaseFinetuning``)."""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn

from shortcut_lightning.batchnorm import hold_batchnorm
from shortcut_lightning.probing.model_parts import freeze_before, modules_before
from shortcut_lightning.reporting.rank_zero_log import rank_zero_log

log = logging.getLogger(__name__)


class PartialFinetuning(BaseFinetuning):
    """Freezes every parameter registered before module ``train_from``; the rest (and the head) trains.

    Why: on a CPU, or with a big backbone, the early stages of an ImageNet network are generic; leaving
    them out of the backward pass makes a step several times cheaper. With ``train_bn=False`` (the
    default) the frozen part's BatchNorm layers also stay in eval mode, on their ImageNet statistics, so
    the frozen stages compute exactly what they computed before fine-tuning.

    Args:
        train_from: dotted name of the first module that trains (e.g. ``net.blocks.5`` of an
            EfficientNet, ``net.layer4`` of a ResNet).
        train_bn: let the frozen part's BatchNorm layers update their statistics (Lightning's default
            for ``BaseFinetuning.freeze``); off keeps them fixed.

    Example::

        trainer = L.Trainer(callbacks=[PartialFinetuning(train_from="net.blocks.5")])
        trainer.fit(ShortcutClassifier("efficientnet_lite0", weights="imagenet"), datamodule=dm)
    """

    def __init__(self, train_from: str, train_bn: bool = False) -> None:
        super().__init__()
        self.train_from = train_from
        self.train_bn = train_bn

    def frozen_modules(self, pl_module: L.LightningModule) -> list[nn.Module]:
        """The leaf modules before ``train_from``: the part that does not train."""
        return modules_before(pl_module, self.train_from, "train_from")

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        frozen = freeze_before(pl_module, self.train_from, "train_from")
        rank_zero_log(log, f"PartialFinetuning: froze {frozen} parameter tensors before {self.train_from}")

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: object) -> None:
        """Nothing unfreezes later (override to unfreeze at some epoch, as ``BaseFinetuning`` does)."""

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, batch_idx: int
    ) -> None:
        """The frozen BatchNorm layers in eval mode for every step (Lightning sets train mode after validation)."""
        if not self.train_bn:
            for module in self.frozen_modules(pl_module):
                hold_batchnorm(module)
