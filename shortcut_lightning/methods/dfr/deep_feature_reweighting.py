"""``DeepFeatureReweighting``: refit the last layer on group-balanced held-out embeddings (DFR)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from shortcut_lightning.errors import DataError, ShortcutError
from shortcut_lightning.methods.dfr.last_layer import C_GRID, LinearHead, check_balance_labels, fit_dfr
from shortcut_lightning.methods.dfr.last_layer_refit import LastLayerRefit
from shortcut_lightning.probing.embedding_pass import Embeddings

BALANCE = ("groups", "classes")


class DeepFeatureReweighting(LastLayerRefit):
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
    shard, the shards' features are gathered to rank 0 alone, rank 0 fits and reports, and broadcasts both.

    Args:
        split: held-out split to refit on (``val``; ``train`` is "DFR on train").
        scaler_split: split whose embeddings fit the standardisation of the final refits (the reference
            uses ``train``); ``None`` uses ``split``.
        balance: ``groups`` (group labels) or ``classes`` (no group labels needed).
        num_refits: balanced subsamples averaged into the final head.
        c_grid: inverse L1 strengths tried.
        seed: seed of the splits and subsamples.
        workers: processes for the independent fits (each C, each refit); ``None``: every core this process
            may use. The head is the same for any number (liblinear's ``rand()`` is per process, see
            :mod:`~shortcut_lightning.methods.dfr.fit_pool`).
        head: dotted path of the head when it cannot be found (timm ``get_classifier()``, last Linear).
        report_splits: splits whose group accuracy is reported before and after.

    Example::

        trainer = L.Trainer(max_epochs=5, callbacks=[GroupMetrics(), DeepFeatureReweighting()])
        trainer.fit(ShortcutClassifier("resnet18"), datamodule=SyntheticShortcuts())
        trainer.test(datamodule=...)  # the refit model
    """

    stage_label = "DFR"
    name = "dfr"
    uses_annotations = True  # group labels of the refit split; balance="classes" uses none

    def __init__(
        self,
        split: str = "val",
        scaler_split: str | None = "train",
        balance: str = "groups",
        num_refits: int = 20,
        c_grid: Sequence[float] = C_GRID,
        seed: int = 0,
        workers: int | None = None,
        head: str | None = None,
        report_splits: Sequence[str] = ("val", "test"),
    ) -> None:
        if workers is not None and workers < 1:
            raise ShortcutError(f"DFR workers must be >= 1 (or null: every core), got {workers}")
        if balance not in BALANCE:
            raise ShortcutError(f"balance {balance!r} is unknown: choose one of {', '.join(BALANCE)}")
        if num_refits < 1 or not c_grid:
            raise ShortcutError("num_refits must be at least 1 and c_grid must name at least one C")
        super().__init__(split, report_splits, head, extra_splits=(scaler_split,) if scaler_split else ())
        self.scaler_split = scaler_split
        self.balance = balance
        self.uses_annotations = balance == "groups"
        self.num_refits = num_refits
        self.c_grid = tuple(float(c) for c in c_grid)
        self.seed = seed
        self.workers = workers

    def fit_head(self, dm: Any, embeddings: dict[str, Embeddings], head: Any) -> LinearHead:
        refit = embeddings[self.split]
        if self.balance == "groups":
            labels, names, what = refit.group.numpy(), dm.group_names, "group"
            if (labels < 0).any():
                raise DataError(
                    "the refit split has no group labels: use DeepFeatureReweighting(balance='classes')"
                )
            present = np.unique(labels)
            if len(present) < 2:
                raise DataError(
                    f"DFR refit split {self.split!r} holds one group ({names[int(present[0])]!r}): balance='groups' "
                    "needs at least two; refit on a split with every group, or use balance='classes'"
                )
        else:
            labels, names, what = refit.target.numpy(), list(dm.class_names), "class"
        check_balance_labels(labels, names, what, self.split)
        scaler = embeddings[self.scaler_split or self.split].features.numpy()
        return fit_dfr(
            refit.features.numpy(),  # float32 as embedded: fit_dfr makes only the rows it fits float64
            refit.target.numpy(),
            labels,
            scaler,
            dm.num_classes,
            self.c_grid,
            self.num_refits,
            self.seed,
            self.workers,
        )

    def details(self, fitted: LinearHead) -> dict[str, Any]:
        return {
            "c": fitted.c,
            "tuning_worst_accuracy": {str(c): acc for c, acc in fitted.tuning.items()},
            "balance": self.balance,
            "split": self.split,
            "scaler_split": self.scaler_split or self.split,
            "num_refits": self.num_refits,
            "head_zero_fraction": fitted.zero_fraction,
            "refit_zero_fraction": fitted.refit_zero_fraction,
        }

    def scalars(self, fitted: LinearHead) -> dict[str, float]:
        return {"c": fitted.c, "head_zero_fraction": fitted.zero_fraction}
