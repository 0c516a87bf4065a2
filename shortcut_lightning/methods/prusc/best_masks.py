"""The mask logits of PruSC's best mask-learning epoch by a validation metric (``MaskPruning(monitor=...)``)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from shortcut_lightning.errors import ShortcutError
from shortcut_lightning.methods.prusc.kept_copy import (
    IN_MODEL,
    for_checkpoint,
    from_checkpoint,
    is_marker,
    materialised,
)
from shortcut_lightning.methods.prusc.masks import GumbelSigmoidMask
from shortcut_lightning.metrics import SUMMARY_KEYS

STATISTICS = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm's buffers


def logged_score(trainer: L.Trainer, monitor: str) -> float:
    """``monitor``'s value in the validation just ended; a metric that was not logged is named, with those that were."""
    value = trainer.callback_metrics.get(monitor)
    if value is None:
        found = ", ".join(sorted(k for k in trainer.callback_metrics if k.startswith("val/"))) or "none"
        raise ShortcutError(
            f"MaskPruning monitor {monitor!r} was not logged in validation (logged: {found}); "
            "set monitor to one of them, e.g. val/worst_class"
        )
    return float(value)


def report_score(reports: dict[str, dict[str, Any]], monitor: str) -> float | None:
    """``monitor``'s value in group reports by split (``val/worst_class``: ``reports["val"]["worst_class"]``)."""
    split, _, key = monitor.partition("/")
    value = reports.get(split, {}).get(key)
    return None if value is None else float(value)


def beats(score: float, best: dict[str, Any] | None, mode: str) -> bool:
    """Whether ``score`` is better than the best candidate so far (``{"score": ...}``; ``None``: none yet)."""
    if best is None:
        return True
    return score > best["score"] if mode == "max" else score < best["score"]


class BestMasks:
    """Keeps the mask logits whenever ``monitor`` improves; puts the best back once.

    ``best`` (``{"epoch", "score", "logits", "statistics"}``, ``None`` before a validation) is resumable
    state. While the best masks are the model's current ones it holds the marker
    :data:`~shortcut_lightning.methods.prusc.kept_copy.IN_MODEL`, not a copy; :meth:`materialise` copies
    them to the CPU before the masks change. The logits are dropped once restored, so later checkpoints do
    not carry a copy of every mask.
    """

    def __init__(self, monitor: str, mode: str = "max") -> None:
        self.monitor = monitor
        self.mode = mode
        self.best: dict[str, Any] | None = None

    def update(
        self, trainer: L.Trainer, masks: dict[str, GumbelSigmoidMask], model: nn.Module | None = None
    ) -> None:
        """After a validation: keeps the logits if ``monitor`` is the best so far, and with ``model`` its BatchNorm
        statistics (``batchnorm="batch"`` moves them while the masks learn: the best masks need theirs)."""
        self.consider(trainer.current_epoch, logged_score(trainer, self.monitor), masks, model)

    def consider_dense(
        self,
        reports: dict[str, dict[str, Any]],
        masks: dict[str, GumbelSigmoidMask],
        model: nn.Module | None = None,
    ) -> None:
        """The dense model as a candidate, scored by ``monitor``'s value in its group reports by split
        (``val/worst_class``: ``reports["val"]["worst_class"]``); warns where they lack it."""
        value = report_score(reports, self.monitor)
        if value is None:
            rank_zero_warn(
                f"PruSC keep_dense: {self.monitor} is not a summary of the before report (report_splits with "
                f"{self.monitor.partition('/')[0]!r}, a key of {', '.join(SUMMARY_KEYS)}); only mask epochs "
                "are candidates"
            )
            return
        self.consider(None, value, masks, model)

    def consider(
        self,
        epoch: int | None,
        score: float,
        masks: dict[str, GumbelSigmoidMask],
        model: nn.Module | None = None,
    ) -> None:
        """Keeps these logits (and ``model``'s BatchNorm statistics) if ``score`` beats the best so far;
        ``epoch`` ``None`` is the dense model, before any mask epoch. They are the model's own until
        :meth:`materialise`."""
        if not beats(score, self.best, self.mode):
            return
        statistics = None if model is None else IN_MODEL
        self.best = {"epoch": epoch, "score": score, "logits": IN_MODEL, "statistics": statistics}

    def materialise(self, masks: dict[str, GumbelSigmoidMask], model: nn.Module | None = None) -> None:
        """Copies what is kept as the model's own (after a resume: what the checkpoint had as the model's),
        before the masks or the statistics change."""
        if self.best is not None:
            self.best["logits"] = materialised(self.best["logits"], lambda: _logits(masks))
            self.best["statistics"] = materialised(self.best.get("statistics"), lambda: _statistics(model))

    def state(
        self, masks: dict[str, GumbelSigmoidMask], model: nn.Module | None = None
    ) -> dict[str, Any] | None:
        """``best`` as a checkpoint stores it: no tensor that the model's state already holds."""
        if self.best is None:
            return None
        logits = for_checkpoint(self.best["logits"], _logits(masks))
        statistics = for_checkpoint(self.best.get("statistics"), _statistics(model))
        return {**self.best, "logits": logits, "statistics": statistics}

    def load(self, saved: dict[str, Any] | None) -> None:
        """``best`` from a checkpoint's :meth:`state` (its markers are read from the model before it changes)."""
        if saved is not None:
            statistics = from_checkpoint(saved.get("statistics"))
            saved = {**saved, "logits": from_checkpoint(saved["logits"]), "statistics": statistics}
        self.best = saved

    def restore(
        self, masks: dict[str, GumbelSigmoidMask], model: nn.Module | None = None
    ) -> dict[str, Any] | None:
        """Puts the best epoch's logits back; returns ``{"monitor", "epoch", "score"}``, or ``None`` if none was seen."""
        if self.best is None:
            rank_zero_info(
                f"PruSC: {self.monitor} was never validated during mask learning; the last masks are kept"
            )
            return None
        # a marker is the model's own tensor (it is materialised before the model changes): nothing to put back
        logits, statistics = self.best["logits"], self.best.get("statistics")
        if isinstance(logits, dict):
            with torch.no_grad():
                for name, mask in masks.items():
                    if not is_marker(logits[name]):
                        mask.logits.copy_(logits[name])
        if model is not None and isinstance(statistics, dict):
            kept = {k: v for k, v in statistics.items() if not is_marker(v)}
            model.load_state_dict(kept, strict=False)
        self.best["logits"] = self.best["statistics"] = None
        which = (
            "the dense model" if self.best["epoch"] is None else f"the masks of epoch {self.best['epoch']}"
        )
        rank_zero_info(f"PruSC: {which} is kept ({self.monitor} {self.best['score']:.4f})")
        return {"monitor": self.monitor, "epoch": self.best["epoch"], "score": self.best["score"]}


def _logits(masks: dict[str, GumbelSigmoidMask]) -> dict[str, Tensor]:
    return {name: m.logits for name, m in masks.items()}


def _statistics(model: nn.Module | None) -> dict[str, Tensor]:
    """``model``'s BatchNorm statistics by state-dict name (none without a model)."""
    if model is None:
        return {}
    return {k: v for k, v in model.state_dict().items() if k.endswith(STATISTICS)}
