"""What the trainer trains on during PruSC: the split of each epoch, cluster-balanced where it was clustered."""

from __future__ import annotations

import logging

import lightning as L
from torch import Tensor

from shortcut_lightning.methods.prusc.clusters import cluster_balance_weights
from shortcut_lightning.reporting.rank_zero_log import rank_zero_log

log = logging.getLogger(__name__)


class TrainingData:
    """Points the datamodule at a split through its ``train_on`` contract; a change of split rebuilds the loader.

    Lightning builds the training loader once; when the split changes, ``reload_dataloaders_every_n_epochs``
    is set to 1 for one epoch and then given back (:meth:`epoch_started`). With ``balanced``, the split that was
    clustered (``clustered``) is drawn with every cluster equally likely. ``split`` is resumable state.
    """

    def __init__(self, clustered: str, balanced: bool) -> None:
        self.clustered = clustered
        self.balanced = balanced
        self.split: str | None = None  # the split the datamodule was last pointed at
        self._reload_every: int | None = None  # the trainer's own setting while a rebuild is pending

    def point(self, trainer: L.Trainer, split: str, clusters: Tensor | None) -> None:
        """Trains on ``split`` from the next loader on; ``clusters`` (by sample index) balance the draws over the
        clustered split, their weights computed once the datamodule draws from it."""
        dm = trainer.datamodule
        self.split = split
        if split != dm.train_split:
            dm.train_on(split)
            if trainer.train_dataloader is not None and self._reload_every is None:
                self._reload_every = trainer.reload_dataloaders_every_n_epochs
                trainer.reload_dataloaders_every_n_epochs = 1
            held_out = " (validation metrics from now on are on data it trains on)" if split == "val" else ""
            rank_zero_log(log, f"PruSC: the trainer now trains on the {split} split{held_out}")
        if self.balanced and split == self.clustered:
            self._reweight(trainer, cluster_balance_weights(clusters, dm.train_positions()))

    def epoch_started(self, trainer: L.Trainer) -> None:
        """Gives the trainer its own reload setting back once the loader of the new split was built."""
        if self._reload_every is not None:
            trainer.reload_dataloaders_every_n_epochs, self._reload_every = self._reload_every, None

    @staticmethod
    def _reweight(trainer: L.Trainer, weights: Tensor) -> None:
        """The datamodule's weights for a loader yet to be built, and the live sampler's."""
        trainer.datamodule.reweight(
            weights, "MaskPruning(cluster_balanced=True) (or set cluster_balanced: false)"
        )
