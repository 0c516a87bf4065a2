"""``ModelStage``: the base of stages that act once on a trained model (DFR, s-score)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class ModelStage(Callback):
    """Runs :meth:`run` at the end of ``fit``, or once before ``validate``/``test``.

    Before an evaluation it runs again whenever weights were just loaded from a checkpoint
    (``trainer.ckpt_path``); on the in-memory model it runs once, so the test pass right after ``fit``
    evaluates the model the stage already changed instead of changing it twice.
    """

    def __init__(self) -> None:
        self._ran_in_memory = False

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        raise NotImplementedError

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        result = self.run(trainer, pl_module)
        self._ran_in_memory = True
        return result

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._before_evaluation(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._before_evaluation(trainer, pl_module)

    def _before_evaluation(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is not None or not self._ran_in_memory:
            self._run(trainer, pl_module)
