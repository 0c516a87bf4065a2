"""``MaskPruning``: PruSC's lifecycle, a subnetwork found by mask learning with a contrastive loss over clusters.

=========================  =========================================================================
phase                      what the stage does
=========================  =========================================================================
``waiting``                nothing (ERM epochs) until ``start_epoch``
``learning``               clusters found, weights frozen, the masks learn (``prune_epochs``)
``fixed``                  the best masks fixed, the surviving weights fine-tuned (``finetune_epochs``)
end of ``fit``             the best state put back, the masks baked in, ``prusc.json``, ``pruned.ckpt``
=========================  =========================================================================

Its helpers: the arguments (:mod:`.arguments`), the clustering pass (:mod:`.cluster_pass`), the masks
(:mod:`.masks`), the best states (:mod:`.keep_best`), what the trainer trains on (:mod:`.training_data`).
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Any

import lightning as L
import torch
from torch import Tensor

from shortcut_lightning.backbones import PLAIN_WEIGHTS, WEIGHT_MASKS
from shortcut_lightning.batchnorm import hold_batchnorm, recalibrate_batchnorm, whole_split
from shortcut_lightning.data.base import require_group_datamodule
from shortcut_lightning.methods.prusc.arguments import PruSCConfig, check_strategy
from shortcut_lightning.methods.prusc.cluster_pass import cluster_split
from shortcut_lightning.methods.prusc.conv_reach import SplitReach
from shortcut_lightning.methods.prusc.keep_best import BestMasks, BestWeights
from shortcut_lightning.methods.prusc.masks import (
    GumbelSigmoidMask,
    attach_masks,
    bake_masks,
    densities,
    density_summary,
    log_densities,
    model_masks,
    set_density,
    set_masks_mode,
    step_mask_logits,
    weight_masks,
)
from shortcut_lightning.methods.prusc.prusc_report import PruSCReport, model_reports
from shortcut_lightning.methods.prusc.supcon import ClusterPenalty
from shortcut_lightning.methods.prusc.training_data import TrainingData
from shortcut_lightning.probing.model_parts import find_module
from shortcut_lightning.reporting.rank_zero_log import rank_zero_log
from shortcut_lightning.stages import Stage

log = logging.getLogger(__name__)


class PruSCPhase(str, Enum):
    """PruSC's phases (a checkpoint stores these strings)."""

    WAITING = "waiting"
    LEARNING = "learning"
    FIXED = "fixed"


class MaskPruning(Stage):
    """Learns which weights to keep so that an ERM model's spurious clusters break apart (PruSC: "Pruning
    Spurious Correlations", Le et al., TMLR).

    At ``start_epoch`` (0: the model as loaded, e.g. ``model.weights=erm.ckpt``) the training split
    is embedded (evaluation transforms) and clustered with cosine k-means (``num_clusters``; no group
    labels). Then every weight is frozen and each conv and linear weight of ``modules`` gets a mask
    logit (BatchNorm stays unmasked), sampled as a straight-through Gumbel-sigmoid in training and
    thresholded at evaluation. For ``prune_epochs`` the loss is the module's cross-entropy plus,
    through the penalty seam, ``lambda_sparse`` times the ``sparsity`` term and ``beta * SupCon`` on the
    normalised penultimate features of the same forward (positives: same class, other cluster;
    negatives: the anchor's cluster; :func:`~shortcut_lightning.methods.prusc.supcon.cluster_supcon`). Then the masks
    are fixed (at ``target_density`` if given; with ``monitor``, the masks of the mask-learning epoch
    whose validation ``monitor`` was best) and, for ``finetune_epochs``, the surviving weights are
    trained with cross-entropy. At the end the masks are multiplied into the weights (``export``), so
    the model that is tested and saved (``checkpoints/pruned.ckpt``) is a plain network.

    Logs ``prune/density/<layer>``, ``prune/Prune_f`` (pruned share of all conv and linear weights),
    ``prune/Prune_h`` (of the head), ``prune/Prune_f_reachable`` (of the weights that can read an image
    pixel at the training image size; on small images many convolution taps read only padding),
    ``train/prusc/supcon`` and ``train/prusc/sparsity``. Writes ``prusc.json`` (clusters, densities,
    group tables before and after). The masks live in the model's state and the phase in this
    callback's, so a killed run resumes mask learning where it stopped.

    ``groups`` (uses group annotations, and says so) and ``split="val"`` change what the trainer trains on
    for the whole fit: use them from a loaded ERM model with ``start_epoch=0``. Under DDP the frozen weights
    need ``strategy="ddp_find_unused_parameters_true"``. docs/methods.md explains every choice.

    Example::

        trainer = L.Trainer(max_epochs=9, callbacks=[MaskPruning(start_epoch=6, prune_epochs=3)])
        trainer.fit(ShortcutClassifier("resnet18", num_classes=2), datamodule=SyntheticShortcuts())

    Args:
        start_epoch: the epoch before which clustering runs and mask learning starts.
        prune_epochs: epochs of mask learning (0 with ``finetune_epochs``: fine-tuning on the clusters alone).
        finetune_epochs: epochs of fine-tuning the surviving weights after the masks are fixed.
        finetune_split: split of those epochs (``train`` or ``val``; default: ``split``).
        num_clusters: k of the k-means (with ``cluster_within="class"``: in each class).
        cluster_layer: the layer whose output, averaged over positions, is clustered (default: the head's
            input, the paper); e.g. ``net.blocks.4``, an intermediate stage (ours; docs/methods.md).
        cluster_within: ``split`` (one k-means over all samples, the paper) or ``class`` (one per class).
        modules: shell-style name patterns of the layers to mask (default: every conv and linear).
        lambda_sparse: weight of the sum of mask probabilities (a per-weight pull towards pruning).
        beta: weight of the contrastive term.
        temperature: SupCon temperature.
        gumbel_temperature: temperature of the Gumbel-sigmoid.
        init_logit: initial mask logit (3: kept with probability 0.95).
        mask_lr: Adam learning rate of the mask logits.
        target_density: fix the masks at this kept share (in (0, 1)) of the masked weights that can read
            an image pixel at the training image size; those that read only padding are pruned.
        monitor: a validation metric (e.g. ``val/worst_class``, class labels only); the masks of the
            mask-learning epoch where it was best are the ones fixed, instead of the last epoch's.
        keep_dense: with ``monitor``, the dense model (scored in the "before" report) is a candidate too:
            masks that validate worse than no pruning at all are not kept (our addition; docs/methods.md).
        finetune_keep: ``last`` (the released code) or ``best`` (with ``monitor``; ours): the best validated of the
            fine-tuning epochs, the masks fixed before them and (``keep_dense``) the model before the stage.
        mode: ``max`` or ``min``: which ``monitor`` value is best.
        split: split to cluster and learn the masks on (``train`` or ``val``).
        cluster_balanced: draw batches with every cluster equally likely (no labels; the small clusters
            an ERM model forms around its minority samples are seen as often as the large ones).
        recalibrate_bn: re-estimate the BatchNorm statistics of the pruned network once the masks are fixed.
        batchnorm: BatchNorm while the masks learn: ``held`` at the dense model's statistics (eval mode),
            or ``batch`` statistics in train mode, its running statistics updated (the released code).
        sparsity: ``probability`` (``lambda_sparse * sum(sigmoid(logits))``) or ``logit``
            (``lambda_sparse * sum(logits)``, the released code).
        groups: train on these group ids only (uses annotations).
        seed: seed of the k-means.
        export: multiply the masks in at the end (plain network, ``pruned.ckpt``).
        report_splits: splits whose group table is logged before and after.
    """

    penalty_name = "prusc"
    stage_label = "PruSC"
    report_file = "prusc.json"
    phases = PruSCPhase
    transitions = ((PruSCPhase.WAITING, PruSCPhase.LEARNING), (PruSCPhase.LEARNING, PruSCPhase.FIXED))
    start_hooks = ("fit_start", "epoch_start")
    tested_file = "pruned"
    uses_annotations = False  # an instance given ``groups`` uses them
    changes_model_at_fit_end = True

    def __init__(
        self,
        start_epoch: int = 0,
        prune_epochs: int = 3,
        finetune_epochs: int = 0,
        finetune_split: str | None = None,
        num_clusters: int = 16,
        cluster_layer: str | None = None,
        cluster_within: str = "split",
        modules: list[str] | None = None,
        lambda_sparse: float = 1e-6,
        beta: float = 1.0,
        temperature: float = 0.07,
        gumbel_temperature: float = 1.0,
        init_logit: float = 3.0,
        mask_lr: float = 0.05,
        target_density: float | None = None,
        monitor: str | None = None,
        keep_dense: bool = True,
        finetune_keep: str = "last",
        mode: str = "max",
        split: str = "train",
        cluster_balanced: bool = True,
        recalibrate_bn: bool = False,
        batchnorm: str = "held",
        sparsity: str = "probability",
        groups: list[int] | None = None,
        seed: int = 0,
        export: bool = True,
        report_splits: tuple[str, ...] = ("val", "test"),
    ) -> None:
        self.config = PruSCConfig.of(locals())  # every argument above, checked
        super().__init__(start_epoch)
        self.uses_annotations = self.config.groups is not None
        self.started_epoch: int | None = None
        self.clusters: Tensor | None = None  # cluster of every sample of ``split``, by its index
        self.report: PruSCReport | None = None
        self._best_masks = BestMasks(monitor, mode, statistics=batchnorm == "batch")
        self._best_weights = BestWeights(monitor if finetune_keep == "best" else None, mode)
        self._penalty = ClusterPenalty(lambda_sparse, beta, temperature, sparsity)
        self._masks: dict[str, GumbelSigmoidMask] = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._optimizer_state: dict[str, Any] | None = None
        self._reach = SplitReach(split)  # the weights that can read an image pixel
        self._data = TrainingData(split, cluster_balanced)

    @property
    def before_reports(self) -> dict[str, dict[str, Any]]:
        return {} if self.report is None else self.report.before

    @property
    def best(self) -> dict[str, Any] | None:
        """With ``monitor``: epoch, score and (until restored) mask logits of the best mask-learning epoch."""
        return self._best_masks.best

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = self.config
        if stage == "fit":  # the data, the strategy and the layer are refused now, not at start_epoch
            dm = require_group_datamodule(getattr(trainer, "datamodule", None), "MaskPruning")
            config.check_data(dm)
            dm.train_on(config.split, groups=config.groups)
            check_strategy(trainer.strategy, trainer.world_size)
            if config.cluster_layer is not None:
                find_module(pl_module, config.cluster_layer, "cluster_layer")
        # masks exist (mode off) before any checkpoint is restored or DDP wraps the model; a checkpoint
        # of this stage that is validated or tested loads its masks (and their mode) into them
        attach_masks(pl_module, config.modules, config.init_logit, config.gumbel_temperature)
        for keeper in (self._best_masks, self._best_weights):
            keeper.bind(pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # resume(), or a due start(): before the training loader exists
        super().on_fit_start(trainer, pl_module)
        if not self.waiting:
            # a resumed run's epoch is restored after this hook: the split saved with the stage's state
            split = self._data.split or self._split_of(trainer.current_epoch)
            self._data.point(trainer, split, self.clusters)

    # -- phases ---------------------------------------------------------------------------------
    def start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Clusters the split and starts learning the masks. Due at ``on_fit_start``, it comes before the training
        loader exists: with worker processes a loader draws its first epoch's order when it starts."""
        self.clusters, self.report = cluster_split(trainer, pl_module, self.config)
        self.started_epoch = trainer.current_epoch
        self._enter(pl_module, PruSCPhase.LEARNING)
        if self.config.keep_dense:  # the dense model competes with every mask epoch and with the fine-tuning
            self._best_masks.consider_dense(self.report.before)
            self._best_weights.consider_report("before the stage", self.report.before)
        if self.config.prune_epochs == 0:  # no mask learning: the fine-tuning on the clusters alone
            self._fix(trainer, pl_module)

    def resume(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Frozen weights, mask modes and the mask optimizer come back for the restored phase."""
        self._enter(pl_module, self.phase)

    def _enter(self, pl_module: L.LightningModule, phase: PruSCPhase) -> None:
        """What a phase sets: the masks' mode, the weights frozen (while the masks learn, or without fine-tuning)
        and the masks' own Adam. A kept best state that is the model's is copied before the modes change."""
        for keeper in (self._best_masks, self._best_weights):
            keeper.materialise()
        learning = phase == PruSCPhase.LEARNING
        self._masks = model_masks(pl_module)
        train_weights = not (learning or self.config.finetune_epochs == 0)
        set_masks_mode(pl_module, self._masks, "learn" if learning else "fixed", train_weights)
        if learning and self._optimizer is None:
            self._optimizer = torch.optim.Adam(
                [m.logits for m in self._masks.values()], lr=self.config.mask_lr
            )
            if self._optimizer_state is not None:  # resumed: Adam's moments continue
                self._optimizer.load_state_dict(self._optimizer_state)
                self._optimizer_state = None
        self.enter(phase)

    def _fix(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Fixes the masks: the best epoch's (with ``monitor``), at ``target_density`` if given; then BatchNorm
        re-estimated (``recalibrate_bn``) and, before a fine-tuning, what the masks alone do."""
        config = self.config
        self._best_weights.materialise()
        if restored := self._best_masks.restore():
            self.report.best = restored
        reach = self._reach(trainer.datamodule, pl_module)
        if config.target_density is not None:
            set_density(model_masks(pl_module), config.target_density, reach)
        rank_zero_log(log, f"PruSC: masks fixed, {density_summary(densities(pl_module, reach))}")
        self._enter(pl_module, PruSCPhase.FIXED)
        if config.recalibrate_bn:
            split = whole_split(trainer.datamodule, config.split)
            what = "PruSC: BatchNorm statistics of the pruned model"
            recalibrate_batchnorm(pl_module, split, what, trainer.is_global_zero)
        if config.finetune_epochs > 0:  # what the masks alone do, before the fine-tuning changes the weights
            self.report.fixed = model_reports(pl_module, config.report_splits, "masks fixed")
            self._best_weights.consider_report("with the masks fixed", self.report.fixed)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)  # a due start()
        epoch = trainer.current_epoch
        if self.phase == PruSCPhase.LEARNING and not self._learning(epoch):
            self._fix(trainer, pl_module)
            log_densities(pl_module, self._reach(trainer.datamodule, pl_module))
        self._data.epoch_started(trainer)
        if not self.waiting:
            self._data.point(trainer, self._split_of(epoch), self.clusters)
        learning, held = self.phase == PruSCPhase.LEARNING, self.config.batchnorm == "held"
        if (learning and held) or (self.phase == PruSCPhase.FIXED and self.config.finetune_epochs == 0):
            hold_batchnorm(pl_module)  # frozen weights: the dense model's statistics, not noisy masks' ones

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.waiting:
            return
        log_densities(pl_module, self._reach(trainer.datamodule, pl_module))
        epoch, config = trainer.current_epoch, self.config
        if epoch >= (self.started_epoch or 0) + config.prune_epochs + config.finetune_epochs - 1:
            trainer.should_stop = True  # the stage is complete: nothing is left to train
        elif self._split_of(epoch + 1) != self._data.split:  # before the next epoch's loader is built
            self._data.point(trainer, self._split_of(epoch + 1), self.clusters)

    def _learning(self, epoch: int) -> bool:
        """Whether ``epoch`` is one of the stage's mask-learning epochs (or before them)."""
        return epoch < (self.started_epoch or 0) + self.config.prune_epochs

    def _split_of(self, epoch: int) -> str:
        """The split the trainer draws from in ``epoch`` of the stage: the masks', then the fine-tuning's."""
        return self.config.split if self._learning(epoch) else self.config.finetune_on

    # -- the loss -------------------------------------------------------------------------------
    def training_penalty(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, outputs: dict[str, Tensor]
    ) -> Tensor | None:
        """The penalty seam: ``lambda_sparse * sparsity + beta * SupCon`` over the clusters, while the masks learn."""
        if self.phase != PruSCPhase.LEARNING:
            return None
        return self._penalty(pl_module, batch, outputs, self._masks, self.clusters)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        for keeper in (self._best_masks, self._best_weights):
            keeper.materialise()  # the step changes the model: a kept best it is is copied

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        """Steps the mask logits with this stage's own Adam, whatever optimizer the module uses.

        The logits are created after DDP wraps the model, so their gradients are averaged over the
        ranks here (the strategy's ``reduce``). A step with a non-finite gradient (e.g. an AMP
        overflow) is skipped, as the module's optimizer skips it.
        """
        if self.phase == PruSCPhase.LEARNING and self._optimizer is not None:
            step_mask_logits(trainer, self._masks, self._optimizer)

    # -- the best epoch -------------------------------------------------------------------------
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """With ``monitor``: a mask epoch, or (``finetune_keep="best"``) a fine-tuning epoch, is a candidate."""
        if trainer.sanity_checking:
            return
        if self.phase == PruSCPhase.LEARNING:
            self._best_masks.validated(trainer)
        elif self.phase == PruSCPhase.FIXED:
            self._best_weights.validated(trainer)

    # -- the end --------------------------------------------------------------------------------
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.waiting:
            rank_zero_log(
                log, f"PruSC: the fit ended before start_epoch {self.start_epoch}; nothing was pruned"
            )
            return
        if self.phase == PruSCPhase.LEARNING:
            self._fix(trainer, pl_module)
        self.report.finetune_best = self._best_weights.restore()
        self.report.densities = densities(pl_module, self._reach(trainer.datamodule, pl_module))
        self.report.after = model_reports(pl_module, self.config.report_splits, "after")
        if self.config.export:
            bake_masks(pl_module)
            for param in pl_module.parameters():
                param.requires_grad_(True)
            if trainer.checkpoint_callback is not None:  # a run that keeps checkpoints (every rank calls)
                self.save_checkpoint(trainer, "pruned")
        self.write_report(trainer, self.report.to_dict(), self.report.summary(), self.report.tables())

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Beside the masked state a resume needs, the masks evaluation multiplies in (``backbones.PLAIN_WEIGHTS``)."""
        if model_masks(pl_module):
            checkpoint[PLAIN_WEIGHTS] = {WEIGHT_MASKS: weight_masks(pl_module)}

    # -- state ----------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """What resuming the phase needs; a kept best tensor the model's state holds is a marker, and the mask
        optimizer's moments are left out once the masks are fixed (nothing steps them again)."""
        learning = self.phase == PruSCPhase.LEARNING and self._optimizer is not None
        return {
            "started_epoch": self.started_epoch,
            "clusters": self.clusters,
            "optimizer": self._optimizer.state_dict() if learning else None,
            "best": self._best_masks.state(),
            "best_weights": self._best_weights.state(),
            "data_split": self._data.split,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.started_epoch = state.get("started_epoch")
        self.clusters = state.get("clusters")
        self._optimizer_state = state.get("optimizer")
        self._best_masks.load(state.get("best"))
        self._best_weights.load(state.get("best_weights"))
        self._data.split = state.get("data_split")

    def load_report(self, saved: Any) -> None:
        self.report = PruSCReport.from_dict(saved) if saved else None
