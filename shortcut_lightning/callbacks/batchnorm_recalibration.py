"""``BatchNormRecalibration``: re-estimate a trained model's BatchNorm statistics on unaugmented images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from shortcut_lightning.batchnorm import batchnorm_layers, recalibrate_batchnorm, whole_split
from shortcut_lightning.data.base import require_group_datamodule
from shortcut_lightning.errors import DataError
from shortcut_lightning.probing.embedding_pass import split_reports
from shortcut_lightning.probing.model_parts import find_head
from shortcut_lightning.reporting.stage_report import stage_tables
from shortcut_lightning.stages import ModelStage


class BatchNormRecalibration(ModelStage):
    """Replaces every BatchNorm's running statistics by those of ``split`` with evaluation transforms.

    Why: fine-tuning with augmentation leaves statistics of augmented batches; the test images are not
    augmented. One pass over the training images fixes that, with no training and no group labels
    (see :mod:`shortcut_lightning.batchnorm`). On the real-photo benchmark it lifts ERM's worst-group
    accuracy by about 0.06 (docs/results.md), so the suite runs it as a control beside every stage:
    a stage that re-estimates BatchNorm (PruSC's ``recalibrate_bn``) must beat this, not ERM alone.

    Runs at the end of ``fit`` (``max_epochs: 0`` with ``model.weights`` a checkpoint: only this), then
    saves ``checkpoints/bn_recalibration.ckpt``; or in ``validate``/``test`` once, on the loaded model.
    Writes ``bn_recalibration.json``: the layers and images counted, group reports before and after on
    ``report_splits``. Under DDP every rank passes the whole split, so each holds exactly the statistics
    one process computes (one forward pass over ``split`` per rank: no collective, no batch-order noise).
    Beside another stage that changes the model at fit end (DFR), the two run in callback-list order.

    Args:
        split: the split whose images (evaluation transforms) give the statistics; ``train`` by default.
        report_splits: splits whose group accuracy is reported before and after.

    Example::

        trainer = L.Trainer(max_epochs=3, callbacks=[BatchNormRecalibration()])
        trainer.fit(ShortcutClassifier("resnet18"), datamodule=SyntheticShortcuts())
        trainer.test(datamodule=...)  # the model with re-estimated statistics
    """

    stage_label = "BN re-estimated"
    report_file = "bn_recalibration.json"
    saves = "bn_recalibration"
    uses_annotations = False
    changes_model_at_fit_end = True

    def __init__(self, split: str = "train", report_splits: Sequence[str] = ("val", "test")) -> None:
        super().__init__()
        self.split = split
        self.report_splits = tuple(report_splits)

    @property
    def before_reports(self) -> dict[str, dict[str, Any]]:
        return self.report.get("before", {})

    def reports(self, trainer: L.Trainer, pl_module: L.LightningModule, when: str) -> dict[str, Any]:
        """Group reports of ``report_splits`` for the model as it is now (``when``: its progress label)."""
        dm = trainer.datamodule
        return split_reports(pl_module, dm, find_head(pl_module), self.report_splits, f"BN ({when}):")

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Re-estimates the statistics of ``pl_module`` in place; returns (and keeps) the report."""
        dm = require_group_datamodule(getattr(trainer, "datamodule", None), type(self).__name__)
        if self.split not in dm.splits:
            raise DataError(
                f"BatchNormRecalibration split {self.split!r} is not in the data; it has {', '.join(dm.splits)}"
            )
        if not batchnorm_layers(pl_module):
            rank_zero_warn(
                "BatchNormRecalibration: the model has no BatchNorm layer; nothing is re-estimated"
            )
        before = self.reports(trainer, pl_module, "before")
        images = recalibrate_batchnorm(
            pl_module, whole_split(dm, self.split), f"BN: statistics of {self.split}", trainer.is_global_zero
        )
        report = {
            "split": self.split,
            "layers": len(batchnorm_layers(pl_module)),
            "images": images,
            "before": before,
            "after": self.reports(trainer, pl_module, "after"),
        }
        tables = stage_tables({"before": report["before"], "after": report["after"]})
        summary = [
            f"BatchNormRecalibration: {report['layers']} layers re-estimated on {images} {self.split} images"
        ]
        self.write_report(trainer, report, summary=summary, tables=tables)
        return report
