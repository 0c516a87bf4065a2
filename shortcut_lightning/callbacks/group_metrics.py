"""``GroupMetrics``: per-group and worst-group accuracy for any LightningModule."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from shortcut_lightning.errors import ShortcutError
from shortcut_lightning.metrics import SUMMARY_KEYS, GroupAccuracy, format_group_table, group_report

EVAL_SPLITS = ("val", "test")


def logits_of(outputs: Any, hook: str = "validation_step") -> Tensor:
    """The logits an evaluation step returned, as a tensor or under ``"logits"`` in a dict."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, dict) and isinstance(outputs.get("logits"), Tensor):
        return outputs["logits"]
    raise ShortcutError(
        f"{hook} must return the logits (a tensor, or a dict with a 'logits' tensor) for group metrics; "
        f"it returned {type(outputs).__name__}"
    )


def field_of(batch: Any, key: str | int) -> Tensor:
    """``batch[key]`` for dict batches, ``batch[index]`` for tuple batches, with a clear error."""
    try:
        return batch[key]
    except (KeyError, IndexError, TypeError) as exc:
        raise ShortcutError(
            f"the batch has no field {key!r}: group metrics need each batch to carry group ids; pass "
            "group_key/target_key (a dict key or a tuple position)"
        ) from exc


class GroupMetrics(Callback):
    """Logs per-group accuracy and worst-group, mean, train-weighted mean, worst-class and balanced accuracy.

    Works on any LightningModule whose ``validation_step``/``test_step`` returns logits (a tensor or a
    dict with ``"logits"``) and whose batches carry group ids and targets. Group facts come from the
    datamodule (``num_groups``, ``num_classes``, ``group_names``, ``group_counts("train")``) or from the
    arguments. Logs ``<split>/acc/<group>`` and ``<split>/<summary>`` with a TensorBoard custom-scalars
    layout (all group curves of a split in one chart); at the end of ``validate``/``test`` prints a
    group table and writes ``metrics.json`` (and ``metrics_<split>.json``) to the log directory.

    Args:
        group_key, target_key: where groups and targets sit in a batch (dict key or tuple index).
        num_groups, num_classes, group_names, train_group_counts: override the datamodule's facts.
        print_table: print the table at the end of ``validate``/``test``.

    Example::

        trainer = L.Trainer(callbacks=[GroupMetrics()], max_epochs=1)
        trainer.fit(ShortcutClassifier("resnet18"), datamodule=SyntheticShortcuts(n_train=256))
        trainer.test(datamodule=...)  # prints the group table, writes metrics.json
    """

    def __init__(
        self,
        group_key: str | int = "group",
        target_key: str | int = "target",
        num_groups: int | None = None,
        num_classes: int | None = None,
        group_names: Sequence[str] | None = None,
        train_group_counts: Sequence[int] | None = None,
        print_table: bool = True,
    ) -> None:
        self.group_key = group_key
        self.target_key = target_key
        self.num_groups = num_groups
        self.num_classes = num_classes
        self.group_names = list(group_names) if group_names is not None else None
        self.train_group_counts = train_group_counts
        self.print_table = print_table
        self.metrics: dict[str, GroupAccuracy] = {}
        self.reports: dict[str, dict[str, Any]] = {}

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = getattr(trainer, "datamodule", None)
        num_groups = self.num_groups or getattr(dm, "num_groups", None)
        num_classes = self.num_classes or getattr(dm, "num_classes", None)
        if num_groups is None or num_classes is None:
            raise ShortcutError(
                "GroupMetrics needs num_groups and num_classes: use a datamodule of shortcut_lightning.data or "
                "pass them as arguments"
            )
        names = self.group_names or getattr(dm, "group_names", None) or [f"g{g}" for g in range(num_groups)]
        counts = self.train_group_counts
        if (
            counts is None
            and dm is not None
            and hasattr(dm, "group_counts")
            and "train" in getattr(dm, "splits", ())
        ):
            counts = dm.group_counts("train")
        self._names = list(names)
        self.metrics = {
            split: GroupAccuracy(
                num_groups, num_classes, None if counts is None else torch.as_tensor(counts)
            ).to(pl_module.device)
            for split in EVAL_SPLITS
        }
        self._add_layout(trainer)

    @rank_zero_only
    def _add_layout(self, trainer: L.Trainer) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                layout = {
                    "groups": {
                        f"{split} accuracy per group": ["Multiline", [f"^{split}/acc/"]]
                        for split in EVAL_SPLITS
                    },
                    "summaries": {
                        f"{split} summaries": ["Multiline", [f"^{split}/({'|'.join(SUMMARY_KEYS)})$"]]
                        for split in EVAL_SPLITS
                    },
                }
                logger.experiment.add_custom_scalars(layout)

    # -- updates --------------------------------------------------------------------------------
    def _update(self, split: str, pl_module: L.LightningModule, outputs: Any, batch: Any, hook: str) -> None:
        logits = logits_of(outputs, hook).detach()
        metric = self.metrics[split]
        if logits.ndim != 2 or logits.shape[1] != metric.num_classes:
            raise ShortcutError(
                f"{hook} returned logits of shape {tuple(logits.shape)} but the data has {metric.num_classes} "
                "classes: the model's head and the data disagree (set model.num_classes)"
            )
        metric.to(logits.device)
        metric.update(logits, field_of(batch, self.target_key), field_of(batch, self.group_key))

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if not trainer.sanity_checking:
            self._update("val", pl_module, outputs, batch, "validation_step")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update("test", pl_module, outputs, batch, "test_step")

    # -- epoch ends -----------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            self.metrics["val"].reset()
            return
        self._finish("val", trainer, pl_module, final=trainer.state.fn == "validate")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish("test", trainer, pl_module, final=True)

    def _finish(self, split: str, trainer: L.Trainer, pl_module: L.LightningModule, final: bool) -> None:
        metric = self.metrics[split]
        result = metric.compute()
        metric.reset()
        report = group_report(result, self._names, split)
        self.reports[split] = report
        for name, group in report["groups"].items():
            if group["acc"] is not None:
                pl_module.log(f"{split}/acc/{name}", group["acc"])
        for key in SUMMARY_KEYS:
            if report[key] is not None:
                pl_module.log(f"{split}/{key}", report[key])
        # trainer.log_dir is a collective under DDP: every rank asks, rank 0 writes
        self._write(Path(trainer.log_dir or trainer.default_root_dir), report, final)

    @rank_zero_only
    def _write(self, log_dir: Path, report: dict[str, Any], final: bool) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(report, indent=2)
        (log_dir / f"metrics_{report['split']}.json").write_text(text)
        if final:
            (log_dir / "metrics.json").write_text(text)
            if self.print_table:
                print("\n" + format_group_table({"acc": report}) + "\n", flush=True)
