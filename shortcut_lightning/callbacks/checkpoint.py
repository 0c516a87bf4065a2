"""``BestAndLastCheckpoint``: Lightning's ModelCheckpoint with a ``last.ckpt`` that follows every epoch."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class BestAndLastCheckpoint(ModelCheckpoint):
    """Keeps the best ``save_top_k`` checkpoints by ``monitor`` and, with ``save_last``, the latest epoch.

    Lightning 2.6 updates ``last.ckpt`` only at steps where a top-k checkpoint is saved, so once the
    monitored metric stops improving, ``last.ckpt`` stops moving and a killed run would resume from an
    old epoch. Here ``last.ckpt`` is written at the end of every epoch (after validation when there is one).

    It calls private ``ModelCheckpoint`` methods, so ``pyproject.toml`` bounds Lightning to the tested minor
    release (2.6); ``tests/test_cli.py`` checks that ``last.ckpt`` follows every epoch.

    Example::

        trainer = L.Trainer(callbacks=[BestAndLastCheckpoint(monitor="val/mean", mode="max", save_last=True)])
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missing(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missing(trainer)

    def _save_last_if_missing(self, trainer: L.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
