"""``MaskPruning``: PruSC, a subnetwork found by mask learning with a supervised contrastive loss over clusters."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from shortcut_lightning.backbones import PLAIN_WEIGHTS, WEIGHT_MASKS
from shortcut_lightning.batchnorm import hold_batchnorm, recalibrate_batchnorm, whole_split
from shortcut_lightning.data.base import require_group_datamodule
from shortcut_lightning.errors import ShortcutError
from shortcut_lightning.methods.prusc.arguments import check_arguments, check_data, check_strategy
from shortcut_lightning.methods.prusc.best_states import BestStates
from shortcut_lightning.methods.prusc.cluster_pass import cluster_split
from shortcut_lightning.methods.prusc.clusters import cluster_balance_weights, cluster_table
from shortcut_lightning.methods.prusc.conv_reach import reachable_weights
from shortcut_lightning.methods.prusc.masks import (
    attach_masks,
    bake_masks,
    densities,
    density_summary,
    model_masks,
    set_density,
    sparsity_term,
    step_mask_logits,
    weight_masks,
)
from shortcut_lightning.methods.prusc.prusc_report import PruSCReport
from shortcut_lightning.methods.prusc.supcon import cluster_supcon
from shortcut_lightning.methods.prusc.training_data import TrainingData
from shortcut_lightning.probing.embedding_pass import split_reports
from shortcut_lightning.probing.model_parts import find_head, find_module


class MaskPruning(Callback):
    """Learns which weights to keep so that an ERM model's spurious clusters break apart (PruSC, seed 000).

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
        report_splits: splits whose group table is printed before and after.
    """

    penalty_name = "prusc"
    stage_label = "PruSC"
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
        check_arguments(
            start_epoch=start_epoch, prune_epochs=prune_epochs, finetune_epochs=finetune_epochs,
            finetune_split=finetune_split, num_clusters=num_clusters, target_density=target_density, mode=mode,
            split=split, lambda_sparse=lambda_sparse, beta=beta, batchnorm=batchnorm, sparsity=sparsity,
            cluster_within=cluster_within, finetune_keep=finetune_keep, monitor=monitor,
        )  # fmt: skip
        self.start_epoch = start_epoch
        self.prune_epochs = prune_epochs
        self.finetune_epochs = finetune_epochs
        self.finetune_split = finetune_split or split
        self.num_clusters = num_clusters
        self.cluster_layer = cluster_layer
        self.cluster_within = cluster_within
        self.modules = modules
        self.lambda_sparse = lambda_sparse
        self.beta = beta
        self.temperature = temperature
        self.gumbel_temperature = gumbel_temperature
        self.init_logit = init_logit
        self.mask_lr = mask_lr
        self.target_density = target_density
        self.monitor = monitor
        self.keep_dense = keep_dense
        self.finetune_keep = finetune_keep
        self.mode = mode
        self.split = split
        self.cluster_balanced = cluster_balanced
        self.recalibrate_bn = recalibrate_bn
        self.batchnorm = batchnorm
        self.sparsity = sparsity
        self.groups = None if groups is None else [int(g) for g in groups]
        self.seed = seed
        self.export = export
        self.report_splits = tuple(report_splits)
        self.phase = "waiting"
        self.started_epoch: int | None = None
        self.clusters: Tensor | None = None  # cluster of every sample of ``split``, by its index
        self.report: PruSCReport | None = None
        self._kept = BestStates(monitor, mode, finetune_keep, batchnorm)
        self._cluster_device: Tensor | None = None
        self._masks: dict[str, Any] = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._optimizer_state: dict[str, Any] | None = None
        self._reachable: dict[str, Tensor] | None = None
        self._data = TrainingData()
        self._model: L.LightningModule | None = None  # the model a checkpoint of this state saves beside it

    @property
    def uses_annotations(self) -> bool:
        return self.groups is not None

    @property
    def before_reports(self) -> dict[str, dict[str, Any]]:
        return {} if self.report is None else self.report.before

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._prepare_fit(trainer)
            if self.cluster_layer is not None:  # refused now, not after the epochs before start_epoch
                find_module(pl_module, self.cluster_layer, "cluster_layer")
        # masks exist (mode off) before any checkpoint is restored or DDP wraps the model; a checkpoint
        # of this stage that is validated or tested loads its masks (and their mode) into them
        attach_masks(pl_module, self.modules, self.init_logit, self.gumbel_temperature)
        self._model = pl_module

    def _prepare_fit(self, trainer: L.Trainer) -> None:
        """Checks the data and the strategy; points the datamodule at the split and groups to train on."""
        dm = require_group_datamodule(getattr(trainer, "datamodule", None), "MaskPruning")
        check_data(dm, self.split, self.finetune_split, self.groups, self.num_clusters)
        dm.train_on(self.split, groups=self.groups)
        check_strategy(trainer.strategy, trainer.world_size)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.phase != "waiting":  # resumed: frozen weights, mask modes and the mask optimizer come back
            self._enter(trainer, pl_module, self.phase, resumed=True)
        elif trainer.current_epoch >= self.start_epoch:
            # before the training loader exists: with worker processes it draws its first epoch's order
            # when it starts, which is before on_train_epoch_start
            self._start(trainer, pl_module)
        if self.phase != "waiting":
            # a resumed run's epoch is restored after this hook: the split saved with the stage's state
            self._point_data(trainer, self._data.split or self._split_of(trainer.current_epoch))

    # -- phases ---------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.phase == "waiting" and epoch >= self.start_epoch:
            self._start(trainer, pl_module)
        elif self.phase == "learning" and epoch >= (self.started_epoch or 0) + self.prune_epochs:
            self._enter(trainer, pl_module, "fixed")
            self._log_densities(trainer, pl_module)
        self._data.epoch_started(trainer)
        if self.phase != "waiting":
            self._point_data(trainer, self._split_of(epoch))
        if (self.phase == "learning" and self.batchnorm == "held") or (
            self.phase == "fixed" and self.finetune_epochs == 0
        ):
            hold_batchnorm(pl_module)  # frozen weights: the dense model's statistics, not noisy masks' ones

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._cluster(trainer, pl_module)
        self.started_epoch = trainer.current_epoch
        self._enter(trainer, pl_module, "learning")
        if self.keep_dense:  # the dense model competes with every mask epoch (and the fine-tuning)
            self._kept.consider_dense(self.report.before, self._masks, pl_module)
        if self.prune_epochs == 0:  # no mask learning: the fine-tuning on the clusters alone
            self._enter(trainer, pl_module, "fixed")

    def _point_data(self, trainer: L.Trainer, split: str) -> None:
        """Trains on ``split`` from the next loader on, cluster-balanced if it is the split that was clustered."""
        dm = trainer.datamodule
        balance = split == self.split and self.cluster_balanced
        weights = (lambda: cluster_balance_weights(self.clusters, dm.train_positions())) if balance else None
        self._data.point(trainer, split, weights)

    def _split_of(self, epoch: int) -> str:
        """The split the trainer draws from in ``epoch`` of the stage: the masks', then the fine-tuning's."""
        learning = epoch < (self.started_epoch or 0) + self.prune_epochs
        return self.split if learning else self.finetune_split

    def _enter(
        self, trainer: L.Trainer, pl_module: L.LightningModule, phase: str, resumed: bool = False
    ) -> None:
        masks = model_masks(pl_module)
        if phase != "fixed" or resumed:  # a kept best state that is the model's is copied before modes change
            self._kept.materialise(masks, pl_module)
        else:
            if restored := self._kept.fix_masks(masks, pl_module):
                self.report.best = restored
            if self.target_density is not None:
                set_density(masks, self.target_density, self._reachable_weights(trainer, pl_module))
            rank_zero_info(
                f"PruSC: masks fixed, {density_summary(densities(pl_module, self._reachable_weights(trainer, pl_module)))}"
            )
        freeze_weights = phase == "learning" or self.finetune_epochs == 0
        logits = {id(m.logits) for m in masks.values()}
        for param in pl_module.parameters():
            if id(param) not in logits:
                param.requires_grad_(not freeze_weights)
        for mask in masks.values():
            mask.set_mode("learn" if phase == "learning" else "fixed")
        self._masks = masks
        if phase == "learning" and self._optimizer is None:
            self._optimizer = torch.optim.Adam([m.logits for m in masks.values()], lr=self.mask_lr)
            if self._optimizer_state is not None:  # resumed: Adam's moments continue
                self._optimizer.load_state_dict(self._optimizer_state)
                self._optimizer_state = None
        self.phase = phase
        if phase == "fixed" and not resumed and self.recalibrate_bn:
            recalibrate_batchnorm(pl_module, whole_split(trainer.datamodule, self.split),
                                  "PruSC: BatchNorm statistics of the pruned model", trainer.is_global_zero)  # fmt: skip
        if phase == "fixed" and not resumed and self.finetune_epochs > 0:
            # what the masks alone do, before the fine-tuning changes the weights
            self.report.fixed = self._reports(pl_module, "masks fixed")
            self._kept.weights.consider_report("with the masks fixed", self.report.fixed, pl_module)

    # -- clustering -----------------------------------------------------------------------------
    def _cluster(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.clusters, found, embedded = cluster_split(
            trainer, pl_module, self.split, self.num_clusters, self.seed, self.cluster_within, self.cluster_layer,
            " [uses group annotations: groups]" if self.uses_annotations else "",
        )  # fmt: skip
        self._cluster_device = None
        self.report = PruSCReport(
            uses_annotations=self.uses_annotations,
            clusters=cluster_table(found.labels, embedded.target, embedded.group, trainer.datamodule),
            kmeans_inertia=found.inertia,
            before=self._reports(pl_module, "before"),
            parameters=self._parameters(),
        )

    def _reports(self, pl_module: L.LightningModule, when: str) -> dict[str, Any]:
        dm, head = pl_module.trainer.datamodule, find_head(pl_module)
        return split_reports(pl_module, dm, head, self.report_splits, f"PruSC ({when}):")

    # -- the loss -------------------------------------------------------------------------------
    def training_penalty(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, outputs: dict[str, Tensor]
    ) -> Tensor | None:
        if self.phase != "learning":
            return None
        if "features" not in outputs:
            raise ShortcutError("MaskPruning needs the penultimate features of the training forward: pass "
                                "{'features': features, 'logits': logits} to total_penalty in training_step")  # fmt: skip
        sparsity = sparsity_term(self._masks, self.sparsity)
        if self._cluster_device is None or self._cluster_device.device != outputs["features"].device:
            self._cluster_device = self.clusters.to(outputs["features"].device)
        clusters = self._cluster_device[batch["index"]]
        supcon = cluster_supcon(outputs["features"], batch["target"], clusters, self.temperature)
        n = len(batch["target"])
        pl_module.log("train/prusc/supcon", supcon.detach(), on_step=True, on_epoch=True, batch_size=n)
        pl_module.log("train/prusc/sparsity", sparsity.detach(), on_step=True, on_epoch=True, batch_size=n)
        return self.lambda_sparse * sparsity + self.beta * supcon

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._kept.materialise(
            self._masks, pl_module
        )  # the step changes the model: a kept best it is is copied

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        """Steps the mask logits with this stage's own Adam, whatever optimizer the module uses.

        The logits are created after DDP wraps the model, so their gradients are averaged over the
        ranks here (the strategy's ``reduce``). A step with a non-finite gradient (e.g. an AMP
        overflow) is skipped, as the module's optimizer skips it.
        """
        if self.phase == "learning" and self._optimizer is not None:
            step_mask_logits(trainer, self._masks, self._optimizer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.phase == "waiting":
            return
        self._log_densities(trainer, pl_module)
        last = (self.started_epoch or 0) + self.prune_epochs + self.finetune_epochs - 1
        if trainer.current_epoch >= last:  # the stage is complete: nothing is left to train
            trainer.should_stop = True
        elif self._split_of(trainer.current_epoch + 1) != self._data.split:
            self._point_data(trainer, self._split_of(trainer.current_epoch + 1))  # before its loader is built

    def _reachable_weights(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Tensor]:
        """The conv taps that can read a pixel of the split's images (found once, from one image)."""
        if self._reachable is None:
            image = trainer.datamodule.dataset(self.split)[0]["image"]
            self._reachable = reachable_weights(pl_module, image[None].to(pl_module.device))
        return self._reachable

    def _log_densities(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name, value in densities(pl_module, self._reachable_weights(trainer, pl_module)).items():
            key = name if name.startswith("Prune_") else f"density/{name}"
            pl_module.log(f"prune/{key}", value, on_epoch=True, rank_zero_only=True)

    # -- the best epoch -------------------------------------------------------------------------
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """With ``monitor``: keeps the best mask epoch's logits (``finetune_keep="best"``: the best tuned model)."""
        if trainer.sanity_checking:
            return
        self._kept.validated(trainer, self.phase, self._masks, pl_module)

    @property
    def best(self) -> dict[str, Any] | None:
        """With ``monitor``: epoch, score and (until restored) mask logits of the best mask-learning epoch."""
        return self._kept.best

    # -- the end --------------------------------------------------------------------------------
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.phase == "waiting":
            rank_zero_info(f"PruSC: the fit ended before start_epoch {self.start_epoch}; nothing was pruned")
            return
        if self.phase == "learning":
            self._enter(trainer, pl_module, "fixed")
        self.report.finetune_best = self._kept.weights.restore(pl_module)
        self.report.densities = densities(pl_module, self._reachable_weights(trainer, pl_module))
        self.report.after = self._reports(pl_module, "after")
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank asks
        if self.export:
            bake_masks(pl_module)
            for param in pl_module.parameters():
                param.requires_grad_(True)
            if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
                trainer.save_checkpoint(Path(trainer.checkpoint_callback.dirpath) / "pruned.ckpt")
        self.report.write(log_dir)

    def _parameters(self) -> dict[str, Any]:
        names = inspect.signature(MaskPruning.__init__).parameters
        return {k: getattr(self, k) for k in names if k not in ("self", "report_splits")}

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Beside the masked state a resume needs, the masks evaluation multiplies in (``backbones.PLAIN_WEIGHTS``)."""
        if model_masks(pl_module):
            checkpoint[PLAIN_WEIGHTS] = {WEIGHT_MASKS: weight_masks(pl_module)}

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The phase and what resuming it needs; a kept best tensor the model's state holds is a marker, and
        the mask optimizer's moments are left out once the masks are fixed (nothing steps them again)."""
        learning = self.phase == "learning" and self._optimizer is not None
        return {
            "phase": self.phase,
            "started_epoch": self.started_epoch,
            "clusters": self.clusters,
            "report": None if self.report is None else self.report.to_dict(),
            "optimizer": self._optimizer.state_dict() if learning else None,
            **self._kept.state_dict(self._masks, self._model),
            "data_split": self._data.split,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.phase = state_dict.get("phase", "waiting")
        self.started_epoch = state_dict.get("started_epoch")
        self.clusters = state_dict.get("clusters")
        saved = state_dict.get("report")
        self.report = PruSCReport.from_dict(saved) if saved else None
        self._optimizer_state = state_dict.get("optimizer")
        self._kept.load_state_dict(state_dict)
        self._data.split = state_dict.get("data_split")
