"""``ShortcutClassifier``: ERM fine-tuning of a timm backbone, with the penalty seam for stages."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from shortcut_lightning.backbones import (
    checkpoint_mismatch,
    classifier_shown,
    create_backbone,
    state_mismatch,
)
from shortcut_lightning.errors import ModelError
from shortcut_lightning.penalties import loss_weighting, total_penalty, weighted_loss


class ShortcutClassifier(L.LightningModule):
    """Image classifier on any timm backbone, trained with cross-entropy plus the callbacks' penalties.

    Args:
        backbone: a name of ``timm.list_models()``.
        num_classes: outputs of the head (the CLI links it to the data).
        pretrained: start from timm's pretrained weights (its hub cache; offline this fails and names
            ``weights``).
        weights: ``imagenet`` (offline ImageNet weights of ``efficientnet_lite0/1/2``, the ``[imagenet]``
            extra), or the path of a backbone state dict or a ShortcutClassifier checkpoint to start from.
        head_init: a new classifier on pretrained features starts at ``zero`` (first loss ln K) or with
            ``nn.Linear``'s init (``linear``).
        optimizer: optimizer factory; default SGD, lr 1e-3, momentum 0.9, weight decay 1e-4 (the papers').
        scheduler: optional learning-rate scheduler factory, stepped every epoch.
        backbone_kwargs: extra arguments of ``timm.create_model`` (e.g. ``drop_rate``).

    Example::

        model = ShortcutClassifier("resnet18", num_classes=2)
        logits = model(torch.randn(2, 3, 32, 32))
        model.features(torch.randn(2, 3, 32, 32)).shape, model.head
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int = 2,
        pretrained: bool = False,
        weights: str | None = None,
        head_init: str = "zero",
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.net = create_backbone(
            backbone, num_classes, pretrained, weights, head_init, **(backbone_kwargs or {})
        )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

    @property
    def head(self) -> nn.Module:
        """The final linear layer (timm's ``get_classifier()``)."""
        return self.net.get_classifier()

    def features(self, x: Tensor) -> Tensor:
        """Penultimate embedding: the input of :attr:`head`."""
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    # -- steps ----------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        features = self.features(batch["image"])
        logits = self.head(features)
        weighting = loss_weighting(self)
        if weighting is None:  # the plain mean, in one fused kernel
            ce = F.cross_entropy(logits, batch["target"])
            fit = ce
        else:  # e.g. GroupDRO: its weights over the per-sample losses
            losses = F.cross_entropy(logits, batch["target"], reduction="none")
            ce, fit = losses.detach().mean(), weighted_loss(self, batch, losses, weighting)
        loss = fit + total_penalty(self, batch, {"logits": logits, "features": features})
        n = len(logits)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("train/ce", ce, on_epoch=True, batch_size=n)
        self.log(
            "train/acc", (logits.argmax(1) == batch["target"]).float().mean(), on_epoch=True, batch_size=n
        )
        return loss

    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> dict[str, Tensor]:
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["target"])
        self.log(f"{stage}/loss", loss, on_epoch=True, batch_size=len(logits))
        return {"logits": logits, "loss": loss}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        logits = self(batch["image"])
        return {
            "logits": logits,
            "pred": logits.argmax(1),
            **{k: batch[k] for k in ("target", "group", "index")},
        }

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        n = getattr(datamodule, "num_classes", None)
        if n is not None and n != self.hparams.num_classes:
            raise ModelError(
                f"model.num_classes={self.hparams.num_classes} but the data ({type(datamodule).__name__}) has {n} "
                f"classes: set model.num_classes: {n} (the shortcut CLI links it from the data)"
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuses, in one line, a checkpoint of another backbone or class count, or whose weights do not fit
        this model (e.g. saved with a callback that adds weights to the model, which this run lacks)."""
        path = getattr(self._trainer, "ckpt_path", None)
        which = f"the checkpoint {path}" if path else "the checkpoint"
        backbone, n = self.hparams.backbone, self.hparams.num_classes
        problem = checkpoint_mismatch(checkpoint, backbone, n)
        if problem:
            raise ModelError(f"{which} {problem}")
        # Lightning's own strict load would list every key in a message of many lines
        saved = checkpoint.get("state_dict", {})
        problem = state_mismatch(saved, self.state_dict(), names=self.strict_loading)
        if problem:
            head = next(name for name, module in self.named_modules() if module is self.head)
            raise ModelError(
                f"{which} does not fit this model ({backbone}, {n} classes): {problem}; "
                f"{classifier_shown(saved, f'{head}.weight')}; load it with the config it was saved with (its "
                "model.backbone and backbone_kwargs, and any callback that adds weights to the model)"
            )

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
        else:
            optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}
