"""The network of PruSC's best validated state after its masks are fixed (``MaskPruning(finetune_keep="best")``)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from shortcut_lightning.methods.prusc.best_masks import beats, logged_score, report_score


class BestWeights:
    """Keeps a CPU copy of the model's state whenever a candidate's ``monitor`` value is the best so far.

    The candidates are the model before the stage (with ``keep_dense``), the masks fixed before the
    fine-tuning, and every fine-tuning epoch; :meth:`restore` puts the best back once, so a fine-tuning
    that drifts (it draws on clusters that may not isolate the minority groups) cannot end below what was
    validated before it. ``best`` (``{"when", "score", "state"}``) is resumable state; the copy is dropped
    once restored, so later checkpoints do not carry it. With ``monitor`` ``None`` nothing is kept.

    Example::

        keeper = BestWeights("val/worst_class")
        keeper.consider("before the stage", 0.80, model)
        keeper.consider("after fine-tuning epoch 2", 0.75, model)  # worse: nothing is copied
        keeper.restore(model)  # the state validated at 0.80
    """

    def __init__(self, monitor: str | None, mode: str = "max") -> None:
        self.monitor = monitor
        self.mode = mode
        self.best: dict[str, Any] | None = None

    def consider(self, when: str, score: float | None, model: nn.Module) -> None:
        """Copies ``model``'s state (weights, mask logits, BatchNorm statistics) if ``score`` is the best so far;
        ``None`` (a report without ``monitor``) is no candidate."""
        if self.monitor is None or score is None or not beats(score, self.best, self.mode):
            return
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.best = {"when": when, "score": score, "state": state}

    def consider_report(self, when: str, reports: dict[str, dict[str, Any]], model: nn.Module) -> None:
        """A state scored in group reports by split (the stage's before and masks-fixed reports)."""
        self.consider(when, None if self.monitor is None else report_score(reports, self.monitor), model)

    def update(self, trainer: L.Trainer, model: nn.Module) -> None:
        """After a fine-tuning epoch's validation."""
        if self.monitor is not None:
            self.consider(
                f"after fine-tuning epoch {trainer.current_epoch}", logged_score(trainer, self.monitor), model
            )

    def restore(self, model: nn.Module) -> dict[str, Any] | None:
        """Puts the best state back; returns ``{"monitor", "when", "score"}``, or ``None`` if none was seen."""
        if self.best is None:
            return None
        if self.best["state"] is not None:  # not yet restored
            with torch.no_grad():
                model.load_state_dict(self.best["state"])
            self.best["state"] = None
            rank_zero_info(
                f"PruSC: the model {self.best['when']} is kept ({self.monitor} {self.best['score']:.4f})"
            )
        return {"monitor": self.monitor, "when": self.best["when"], "score": self.best["score"]}
