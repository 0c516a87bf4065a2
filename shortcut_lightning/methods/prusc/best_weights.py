"""The network of PruSC's best validated state after its masks are fixed (``MaskPruning(finetune_keep="best")``)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from shortcut_lightning.methods.prusc.best_masks import beats, logged_score, report_score
from shortcut_lightning.methods.prusc.kept_copy import (
    IN_MODEL,
    for_checkpoint,
    from_checkpoint,
    is_marker,
    materialised,
)


class BestWeights:
    """Keeps the model's state whenever a candidate's ``monitor`` value is the best so far.

    The candidates are the model before the stage (with ``keep_dense``), the masks fixed before the
    fine-tuning, and every fine-tuning epoch; :meth:`restore` puts the best back once, so a fine-tuning
    that drifts (it draws on clusters that may not isolate the minority groups) cannot end below what was
    validated before it. ``best`` (``{"when", "score", "state"}``) is resumable state. While the best is
    the model's current state it holds the marker :data:`~shortcut_lightning.methods.prusc.kept_copy.IN_MODEL`,
    not a copy; :meth:`materialise` copies it to the CPU before the model changes (the stage calls it
    before every training step and before it changes the masks). The copy is dropped once restored, so
    later checkpoints do not carry it. With ``monitor`` ``None`` nothing is kept.

    Example::

        keeper = BestWeights("val/worst_class")
        keeper.consider("before the stage", 0.80, model)
        keeper.materialise(model)  # before the model trains: the kept state is copied
        keeper.consider("after fine-tuning epoch 2", 0.75, model)  # worse: nothing is kept
        keeper.restore(model)  # the state validated at 0.80
    """

    def __init__(self, monitor: str | None, mode: str = "max") -> None:
        self.monitor = monitor
        self.mode = mode
        self.best: dict[str, Any] | None = None

    def consider(self, when: str, score: float | None, model: nn.Module) -> None:
        """Keeps ``model``'s state (weights, mask logits, BatchNorm statistics) if ``score`` is the best so far,
        as the model's own until :meth:`materialise`; ``None`` (a report without ``monitor``) is no candidate."""
        if self.monitor is None or score is None or not beats(score, self.best, self.mode):
            return
        self.best = {"when": when, "score": score, "state": IN_MODEL}

    def materialise(self, model: nn.Module) -> None:
        """Copies what is kept as the model's own (after a resume: what the checkpoint had as the model's)."""
        if self.best is not None:
            self.best["state"] = materialised(self.best["state"], model.state_dict)

    def state(self, model: nn.Module) -> dict[str, Any] | None:
        """``best`` as a checkpoint stores it: no tensor that the model's state already holds."""
        if self.best is None:
            return None
        return {**self.best, "state": for_checkpoint(self.best["state"], model.state_dict())}

    def load(self, saved: dict[str, Any] | None) -> None:
        """``best`` from a checkpoint's :meth:`state` (its markers are read from the model before it changes)."""
        self.best = saved if saved is None else {**saved, "state": from_checkpoint(saved["state"])}

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
            # a marker is the model's own tensor (it is copied before the model changes): nothing to put back
            kept = self.best["state"]
            if isinstance(kept, dict):
                copies = {k: v for k, v in kept.items() if not is_marker(v)}
                with torch.no_grad():
                    model.load_state_dict(copies, strict=len(copies) == len(kept))
            self.best["state"] = None
            rank_zero_info(
                f"PruSC: the model {self.best['when']} is kept ({self.monitor} {self.best['score']:.4f})"
            )
        return {"monitor": self.monitor, "when": self.best["when"], "score": self.best["score"]}
