"""PruSC's best validated states: the best mask epoch's logits and the best state after the masks are fixed."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import nn

from shortcut_lightning.methods.prusc.best_masks import BestMasks
from shortcut_lightning.methods.prusc.best_weights import BestWeights
from shortcut_lightning.methods.prusc.masks import GumbelSigmoidMask


class BestStates:
    """``MaskPruning``'s two keepers: :class:`BestMasks` (with ``monitor``) and :class:`BestWeights`
    (``finetune_keep="best"``).

    Each holds a marker while its best is the model's current state; the stage calls :meth:`materialise`
    before it or a training step changes the model, and a checkpoint's state (:meth:`state_dict`) holds no
    tensor that the model's own state holds.
    """

    def __init__(self, monitor: str | None, mode: str, finetune_keep: str, batchnorm: str) -> None:
        self.masks = None if monitor is None else BestMasks(monitor, mode)
        self.weights = BestWeights(monitor if finetune_keep == "best" else None, mode)
        self.batch_statistics = (
            batchnorm == "batch"
        )  # BatchNorm moves with the masks: the best masks need theirs

    @property
    def best(self) -> dict[str, Any] | None:
        """With ``monitor``: epoch, score and (until restored) mask logits of the best mask-learning epoch."""
        return None if self.masks is None else self.masks.best

    def _statistics_of(self, model: nn.Module) -> nn.Module | None:
        return model if self.batch_statistics else None

    def consider_dense(
        self, before: dict[str, dict[str, Any]], masks: dict[str, GumbelSigmoidMask], model: nn.Module
    ) -> None:
        """``keep_dense``: the model before the stage (its "before" reports) competes with every mask epoch and,
        with ``finetune_keep="best"``, with the fine-tuning."""
        if self.masks is not None:
            self.masks.consider_dense(before, masks, self._statistics_of(model))
            self.weights.consider_report("before the stage", before, model)

    def validated(
        self, trainer: L.Trainer, phase: str, masks: dict[str, GumbelSigmoidMask], model: nn.Module
    ) -> None:
        """After a validation of the stage: a mask epoch, or (masks fixed) a fine-tuning epoch."""
        if self.masks is not None and phase == "learning":
            self.masks.update(trainer, masks, self._statistics_of(model))
        elif phase == "fixed":
            self.weights.update(trainer, model)

    def fix_masks(self, masks: dict[str, GumbelSigmoidMask], model: nn.Module) -> dict[str, Any] | None:
        """Before the masks are fixed: copies a best state that is the model's, then puts the best masks back
        (``{"monitor", "epoch", "score"}``; ``None`` without ``monitor`` or a validation)."""
        self.weights.materialise(model)
        return None if self.masks is None else self.masks.restore(masks, self._statistics_of(model))

    def materialise(self, masks: dict[str, GumbelSigmoidMask], model: nn.Module) -> None:
        """Copies what is kept as the model's own, before the model changes."""
        if self.masks is not None:
            self.masks.materialise(masks, self._statistics_of(model))
        self.weights.materialise(model)

    def state_dict(self, masks: dict[str, GumbelSigmoidMask], model: nn.Module | None) -> dict[str, Any]:
        """``best`` and ``best_weights`` as a checkpoint of ``model`` stores them."""
        if model is None:  # nothing was kept before the stage's setup
            return {"best": self.best, "best_weights": self.weights.best}
        best = None if self.masks is None else self.masks.state(masks, self._statistics_of(model))
        return {"best": best, "best_weights": self.weights.state(model)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.masks is not None:
            self.masks.load(state.get("best"))
        self.weights.load(state.get("best_weights"))
