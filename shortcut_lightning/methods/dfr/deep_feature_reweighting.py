"""``DeepFeatureReweighting``: refit the last layer on group-balanced held-out embeddings (DFR)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

from shortcut_lightning.data.base import require_group_datamodule
from shortcut_lightning.errors import DataError, ModelError, ShortcutError
from shortcut_lightning.methods.dfr.last_layer import C_GRID, LinearHead, check_balance_labels, fit_dfr
from shortcut_lightning.probing.embedding_pass import Embeddings, embed_splits, head_change_reports
from shortcut_lightning.probing.model_parts import find_head
from shortcut_lightning.reporting.stage_report import stage_tables, write_stage_report
from shortcut_lightning.stages import ModelStage, decide_on_rank_zero

BALANCE = ("groups", "classes")


class DeepFeatureReweighting(ModelStage):
    """Deep Feature Reweighting (Kirichenko et al. 2023) with the reference protocol, as a callback.

    Embeds the refit split with evaluation transforms in eval mode, tunes the L1 strength C on a 50/50
    split (one half group-balanced, pick C by worst-group accuracy on the other), then writes the
    average of ``num_refits`` logistic regressions on fresh group-balanced subsamples into the head,
    with the standardisation folded in, so the model stays one plain network. Reports group accuracy
    before and after on ``report_splits`` and the fraction of neurons the L1 head zeroes (Prune_h).

    Writes ``dfr.json`` (C, tuning scores, Prune_h, group reports before/after) and ``dfr_head.pt``
    (the refit weight and bias over raw embeddings) to the log directory. Runs at the end of ``fit``
    (then saves ``checkpoints/dfr.ckpt``), or in ``validate``/``test`` once
    before the loop on the loaded checkpoint. Only the head changes, so every DDP rank embeds its
    shard, the shards are gathered, rank 0 fits and broadcasts the weights.

    Args:
        split: held-out split to refit on (``val``; ``train`` is "DFR on train").
        scaler_split: split whose embeddings fit the standardisation of the final refits (the reference
            uses ``train``); ``None`` uses ``split``.
        balance: ``groups`` (group labels) or ``classes`` (no group labels needed).
        num_refits: balanced subsamples averaged into the final head.
        c_grid: inverse L1 strengths tried.
        seed: seed of the splits and subsamples.
        head: dotted path of the head when it cannot be found (timm ``get_classifier()``, last Linear).
        report_splits: splits whose group accuracy is reported before and after.

    Example::

        trainer = L.Trainer(max_epochs=5, callbacks=[GroupMetrics(), DeepFeatureReweighting()])
        trainer.fit(ShortcutClassifier("resnet18"), datamodule=SyntheticShortcuts())
        trainer.test(datamodule=...)  # the refit model
    """

    stage_label = "DFR"
    changes_model_at_fit_end = True

    @property
    def uses_annotations(self) -> bool:
        """Group labels of the refit split (``balance="groups"``)."""
        return self.balance == "groups"

    @property
    def before_reports(self) -> dict[str, dict[str, Any]]:
        return self.result.get("before", {})

    def __init__(
        self,
        split: str = "val",
        scaler_split: str | None = "train",
        balance: str = "groups",
        num_refits: int = 20,
        c_grid: Sequence[float] = C_GRID,
        seed: int = 0,
        head: str | None = None,
        report_splits: Sequence[str] = ("val", "test"),
    ) -> None:
        if balance not in BALANCE:
            raise ShortcutError(f"balance {balance!r} is unknown: choose one of {', '.join(BALANCE)}")
        if num_refits < 1 or not c_grid:
            raise ShortcutError("num_refits must be at least 1 and c_grid must name at least one C")
        super().__init__()
        self.split = split
        self.scaler_split = scaler_split
        self.balance = balance
        self.num_refits = num_refits
        self.c_grid = tuple(float(c) for c in c_grid)
        self.seed = seed
        self.head_path = head
        self.report_splits = tuple(report_splits)
        self.result: dict[str, Any] = {}

    # -- when ----------------------------------------------------------------------------------
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        trainer.save_checkpoint(Path(self._log_dir(trainer)) / "checkpoints" / "dfr.ckpt", weights_only=False)

    # -- what ----------------------------------------------------------------------------------
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Refit the head of ``pl_module`` in place; returns (and keeps) the report."""
        dm = require_group_datamodule(getattr(trainer, "datamodule", None), "DeepFeatureReweighting")
        head = find_head(pl_module, self.head_path)
        if head.out_features != dm.num_classes:
            raise ModelError(
                f"the head found ({head}) has {head.out_features} outputs but the data has {dm.num_classes} "
                "classes: name the right layer with DeepFeatureReweighting(head=...)"
            )
        splits = [self.split, *(s for s in self.report_splits if s != self.split)]
        if self.scaler_split and self.scaler_split not in splits:
            splits.append(self.scaler_split)
        embeddings = embed_splits(pl_module, dm, head, splits, "DFR: embedding")
        if self.split not in embeddings:
            raise DataError(
                f"DFR refit split {self.split!r} is not in the data; it has {', '.join(dm.splits)}"
            )
        fitted = self._fit_on_rank_zero(trainer, dm, embeddings)
        with torch.no_grad():
            head.weight.copy_(torch.as_tensor(fitted.weight, dtype=head.weight.dtype))
            if head.bias is not None:
                head.bias.copy_(torch.as_tensor(fitted.bias, dtype=head.bias.dtype))
        self.result = self._report(dm, embeddings, fitted)
        self._write(trainer, Path(self._log_dir(trainer)), self.result, fitted)
        return self.result

    def _fit_on_rank_zero(self, trainer: L.Trainer, dm: Any, embeddings: dict[str, Embeddings]) -> LinearHead:
        """The refit on rank 0, broadcast; its data errors reach every rank (:func:`decide_on_rank_zero`)."""
        return decide_on_rank_zero(trainer, lambda: self._fit(dm, embeddings))

    def _fit(self, dm: Any, embeddings: dict[str, Embeddings]) -> LinearHead:
        refit = embeddings[self.split]
        if self.balance == "groups":
            labels, names, what = refit.group.numpy(), dm.group_names, "group"
            if (labels < 0).any():
                raise DataError(
                    "the refit split has no group labels: use DeepFeatureReweighting(balance='classes')"
                )
        else:
            labels, names, what = refit.target.numpy(), list(dm.class_names), "class"
        check_balance_labels(labels, names, what, self.split)
        scaler = embeddings[self.scaler_split or self.split].features.numpy()
        return fit_dfr(
            refit.features.double().numpy(),
            refit.target.numpy(),
            labels,
            scaler.astype(np.float64),
            dm.num_classes,
            self.c_grid,
            self.num_refits,
            self.seed,
        )

    def _report(self, dm: Any, embeddings: dict[str, Embeddings], fitted: LinearHead) -> dict[str, Any]:
        reported = {s: e for s, e in embeddings.items() if s in self.report_splits}
        return {
            "c": fitted.c,
            "tuning_worst_accuracy": {str(c): acc for c, acc in fitted.tuning.items()},
            "balance": self.balance,
            "split": self.split,
            "scaler_split": self.scaler_split or self.split,
            "num_refits": self.num_refits,
            "head_zero_fraction": fitted.zero_fraction,
            "refit_zero_fraction": fitted.refit_zero_fraction,
            **head_change_reports(dm, reported, torch.as_tensor(fitted.weight), torch.as_tensor(fitted.bias)),
        }

    def _log_dir(self, trainer: L.Trainer) -> str:
        return trainer.log_dir or trainer.default_root_dir  # a collective under DDP: call on every rank

    @rank_zero_only
    def _write(self, trainer: L.Trainer, log_dir: Path, report: dict[str, Any], fitted: LinearHead) -> None:
        tables = stage_tables({"before": report["before"], "DFR": report["after"]})
        write_stage_report(log_dir, "dfr.json", report, tables=tables)
        torch.save(
            {"weight": torch.as_tensor(fitted.weight), "bias": torch.as_tensor(fitted.bias)},
            log_dir / "dfr_head.pt",
        )
        scalars = {"dfr/c": report["c"], "dfr/head_zero_fraction": report["head_zero_fraction"]}
        for key in ("before", "after"):
            for split, r in report[key].items():
                for name in ("wga", "mean", "weighted_mean"):
                    if r[name] is not None:
                        scalars[f"dfr/{split}/{name}_{key}"] = r[name]
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)

    # -- resumable state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"result": self.result}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.result = state_dict.get("result", {})
