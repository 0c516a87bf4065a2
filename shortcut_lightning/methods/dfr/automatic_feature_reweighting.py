"""``AutomaticFeatureReweighting``: AFR (Qiu et al. 2023), a last-layer refit weighted by the ERM model's errors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from shortcut_lightning.errors import ShortcutError
from shortcut_lightning.methods.dfr.afr_fit import GAMMA_GRID, L2_GRID, fit_afr
from shortcut_lightning.methods.dfr.last_layer import LinearHead
from shortcut_lightning.methods.dfr.last_layer_refit import LastLayerRefit
from shortcut_lightning.probing.embedding_pass import Embeddings


class AutomaticFeatureReweighting(LastLayerRefit):
    """Automatic Feature Reweighting (Qiu et al. 2023), no group labels, on DFR's machinery.

    Embeds the held-out ``split`` with the ERM model, weights each sample by ``exp(-gamma p)`` (``p``: the ERM
    model's probability of its true class, so the samples ERM gets wrong weigh most; each class scaled to the
    same total), and retrains the head from the ERM head with a weighted cross-entropy plus
    ``l2 * ||W - W_ERM||^2`` (L-BFGS). ``gamma`` and the L2 strength are tuned together by cross-fitting on
    ``split`` (``folds`` folds, mean worst-class accuracy: class labels only; the paper tunes both with group
    labels), then the head is refit on all of it. Writes ``afr.json`` (the settings, every pair's score, the
    group reports before and after) and ``afr_head.pt``; runs when and where DFR runs
    (:class:`~shortcut_lightning.methods.dfr.last_layer_refit.LastLayerRefit`).

    Example::

        trainer = L.Trainer(max_epochs=0, callbacks=[AutomaticFeatureReweighting(gamma=[1.0, 2.0, 4.0])])
        trainer.fit(ShortcutClassifier("resnet18", weights="erm.ckpt"), datamodule=SyntheticShortcuts())

    Args:
        split: held-out split to refit on (``val``).
        gamma: how sharply the weights favour the samples ERM predicts badly: one value, or the values tuned
            (0: class balance alone).
        l2_grid: L2 strengths tried.
        folds: folds of the cross-fitted tuning (2+).
        seed: seed of the folds.
        workers: processes for the grid's fits; ``None``: every core this process may use.
        head: dotted path of the head when it cannot be found.
        report_splits: splits whose group accuracy is reported before and after.
    """

    stage_label = "AFR"
    name = "afr"
    uses_annotations = False

    def __init__(
        self,
        split: str = "val",
        gamma: float | Sequence[float] = GAMMA_GRID,
        l2_grid: Sequence[float] = L2_GRID,
        folds: int = 2,
        seed: int = 0,
        workers: int | None = None,
        head: str | None = None,
        report_splits: Sequence[str] = ("val", "test"),
    ) -> None:
        gammas = (gamma,) if isinstance(gamma, (int, float)) else tuple(gamma)
        if not gammas or min(gammas) < 0:
            raise ShortcutError(f"AFR gamma must be one value or a list of values, all >= 0, got {gamma}")
        if workers is not None and workers < 1:
            raise ShortcutError(f"AFR workers must be >= 1 (or null: every core), got {workers}")
        if folds < 2:
            raise ShortcutError(f"AFR folds must be >= 2 (fit on some, score on the rest), got {folds}")
        if not l2_grid or min(l2_grid) < 0:
            raise ShortcutError(f"AFR l2_grid must name at least one strength, all >= 0, got {list(l2_grid)}")
        super().__init__(split, report_splits, head)
        self.gamma_grid = tuple(float(v) for v in gammas)
        self.folds = folds
        self.workers = workers
        self.l2_grid = tuple(float(v) for v in l2_grid)
        self.seed = seed

    def fit_head(self, dm: Any, embeddings: dict[str, Embeddings], head: torch.nn.Linear) -> LinearHead:
        refit = embeddings[self.split]
        bias = head.bias.detach().cpu() if head.bias is not None else torch.zeros(head.out_features)
        return fit_afr(
            refit.features,
            refit.logits,
            refit.target,
            head.weight.detach().cpu(),
            bias,
            dm.num_classes,
            self.gamma_grid,
            self.l2_grid,
            self.folds,
            self.seed,
            self.workers,
        )

    def details(self, fitted: LinearHead) -> dict[str, Any]:
        return {
            "gamma": fitted.chosen["gamma"],
            "l2": fitted.c,
            "tuning_worst_class_accuracy": {f"gamma={g},l2={c}": v for (g, c), v in fitted.tuning.items()},
            "folds": self.folds,
            "split": self.split,
            "uses_annotations": False,
        }

    def scalars(self, fitted: LinearHead) -> dict[str, float]:
        return {"l2": fitted.c, "gamma": fitted.chosen["gamma"]}
