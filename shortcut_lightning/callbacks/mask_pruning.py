"""``MaskPruning``: PruSC, a subnetwork found by mask learning with a supervised contrastive loss over clusters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from shortcut_lightning.conv_reach import reachable_weights
from shortcut_lightning.data.base import TRAIN_SPLITS, require_group_datamodule
from shortcut_lightning.data.samplers import BalancedSampler
from shortcut_lightning.embedding_pass import collect_embeddings, embed_splits, group_reports
from shortcut_lightning.errors import ShortcutError
from shortcut_lightning.kmeans import cosine_kmeans
from shortcut_lightning.masks import attach_masks, bake_masks, densities, model_masks, set_density
from shortcut_lightning.metrics import format_group_table
from shortcut_lightning.model_parts import find_head
from shortcut_lightning.supcon import cluster_supcon


class MaskPruning(Callback):
    """Learns which weights to keep so that an ERM model's spurious clusters break apart (PruSC, seed 000).

    At ``start_epoch`` (0: the model as loaded, e.g. ``model.weights=erm.ckpt``) the training split
    is embedded (evaluation transforms) and clustered with cosine k-means (``num_clusters``; no group
    labels). Then every weight is frozen and each conv and linear weight of ``modules`` gets a mask
    logit (BatchNorm stays unmasked), sampled as a straight-through Gumbel-sigmoid in training and
    thresholded at evaluation. For ``prune_epochs`` the loss is the module's cross-entropy plus,
    through the penalty seam, ``lambda_sparse * sum(sigmoid(logits))`` and ``beta * SupCon`` on the
    normalised penultimate features of the same forward (positives: same class, other cluster;
    negatives: the anchor's cluster; :func:`~shortcut_lightning.supcon.cluster_supcon`). Then the masks
    are fixed (at ``target_density`` if given; with ``monitor``, the masks of the mask-learning epoch
    whose validation ``monitor`` was best) and, for ``finetune_epochs``, the surviving weights are
    trained with cross-entropy. At the end the masks are multiplied into the weights (``export``), so
    the model that is tested and saved (``checkpoints/pruned.ckpt``) is a plain network.

    Logs ``prune/density/<layer>``, ``prune/Prune_f`` (pruned share of all conv and linear weights),
    ``prune/Prune_h`` (of the head), ``prune/Prune_f_reachable`` (of the weights that can read an image
    pixel at the training image size; on small images many convolution taps read only padding),
    ``train/prusc/supcon`` and ``train/prusc/sparsity``. Writes
    ``prusc.json`` (clusters, densities, group tables before and after). The masks live in the model's
    state and the phase in this callback's, so a killed run resumes mask learning where it stopped.

    ``groups`` trains on those group ids only (the subnetwork analysis of seed 001 sec. 5.3; it uses
    group annotations and says so). ``split="val"`` learns the masks on the validation split instead.
    Both change what the trainer trains on for the whole fit: use them from a loaded ERM model with
    ``start_epoch=0``. ``finetune_split="val"`` fine-tunes the surviving weights on the validation split
    (class labels only, the datamodule's sampler), as the authors' released code retrains its pruned
    network on held-out data; validation metrics of those epochs are then measured on training data.
    Under DDP the frozen weights need ``strategy="ddp_find_unused_parameters_true"``.

    Example::

        trainer = L.Trainer(max_epochs=9, callbacks=[MaskPruning(start_epoch=6, prune_epochs=3)])
        trainer.fit(ShortcutClassifier("resnet18", num_classes=2), datamodule=SyntheticShortcuts())

    Args:
        start_epoch: the epoch before which clustering runs and mask learning starts.
        prune_epochs: epochs of mask learning.
        finetune_epochs: epochs of fine-tuning the surviving weights after the masks are fixed.
        finetune_split: split of those epochs (``train`` or ``val``; default: ``split``).
        num_clusters: k of the k-means.
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
        mode: ``max`` or ``min``: which ``monitor`` value is best.
        split: split to cluster and learn the masks on (``train`` or ``val``).
        cluster_balanced: draw the stage's batches so that every cluster is equally likely (no labels
            needed; the small clusters an ERM model forms around its minority samples are seen as
            often as the large ones).
        recalibrate_bn: re-estimate the BatchNorm statistics of the pruned network once the masks are
            fixed (BatchNorm is held in eval mode while the weights are frozen).
        groups: train on these group ids only (uses annotations).
        seed: seed of the k-means.
        export: multiply the masks in at the end (plain network, ``pruned.ckpt``).
        report_splits: splits whose group table is printed before and after.
    """

    penalty_name = "prusc"
    changes_model_at_fit_end = True

    def __init__(
        self,
        start_epoch: int = 0,
        prune_epochs: int = 3,
        finetune_epochs: int = 0,
        finetune_split: str | None = None,
        num_clusters: int = 16,
        modules: list[str] | None = None,
        lambda_sparse: float = 1e-6,
        beta: float = 1.0,
        temperature: float = 0.07,
        gumbel_temperature: float = 1.0,
        init_logit: float = 3.0,
        mask_lr: float = 0.05,
        target_density: float | None = None,
        monitor: str | None = None,
        mode: str = "max",
        split: str = "train",
        cluster_balanced: bool = True,
        recalibrate_bn: bool = False,
        groups: list[int] | None = None,
        seed: int = 0,
        export: bool = True,
        report_splits: tuple[str, ...] = ("val", "test"),
    ) -> None:
        if prune_epochs < 1:
            raise ShortcutError(f"prune_epochs must be >= 1, got {prune_epochs}")
        for name, value in (("finetune_epochs", finetune_epochs), ("start_epoch", start_epoch)):
            if value < 0:
                raise ShortcutError(f"{name} must be >= 0, got {value}")
        if num_clusters < 2:
            raise ShortcutError(
                f"num_clusters must be >= 2 (SupCon needs other clusters), got {num_clusters}"
            )
        if target_density is not None and not 0 < target_density < 1:
            raise ShortcutError(
                f"target_density must be between 0 and 1 (exclusive), got {target_density}: 0 prunes everything, "
                "1 nothing"
            )
        if mode not in ("max", "min"):
            raise ShortcutError(f"mode must be 'max' or 'min', got {mode!r}")
        for name, value in (("split", split), ("finetune_split", finetune_split or split)):
            if value not in TRAIN_SPLITS:
                raise ShortcutError(f"{name} must be 'train' or 'val', got {value!r}")
        if finetune_split is not None and finetune_epochs == 0:
            raise ShortcutError(
                f"finetune_split {finetune_split!r} needs finetune_epochs >= 1 (there is nothing to fine-tune)"
            )
        for name, value in (("lambda_sparse", lambda_sparse), ("beta", beta)):
            if value < 0:
                raise ShortcutError(f"{name} must be >= 0, got {value}")
        self.start_epoch = start_epoch
        self.prune_epochs = prune_epochs
        self.finetune_epochs = finetune_epochs
        self.finetune_split = finetune_split or split
        self.num_clusters = num_clusters
        self.modules = modules
        self.lambda_sparse = lambda_sparse
        self.beta = beta
        self.temperature = temperature
        self.gumbel_temperature = gumbel_temperature
        self.init_logit = init_logit
        self.mask_lr = mask_lr
        self.target_density = target_density
        self.monitor = monitor
        self.mode = mode
        self.split = split
        self.cluster_balanced = cluster_balanced
        self.recalibrate_bn = recalibrate_bn
        self.groups = None if groups is None else [int(g) for g in groups]
        self.seed = seed
        self.export = export
        self.report_splits = tuple(report_splits)
        self.phase = "waiting"
        self.started_epoch: int | None = None
        self.clusters: Tensor | None = None  # cluster of every sample of ``split``, by its index
        self.report: dict[str, Any] = {}
        # with ``monitor``: the epoch, score and mask logits (until restored) of the best mask-learning epoch
        self.best: dict[str, Any] | None = None
        self._cluster_device: Tensor | None = None
        self._masks: dict[str, Any] = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._optimizer_state: dict[str, Any] | None = None
        self._reachable: dict[str, Tensor] | None = None
        self.data_split: str | None = None  # the split the datamodule was last pointed at
        # the trainer's own reload setting, while a change of split makes it rebuild the training loader
        self._reload_every: int | None = None

    @property
    def uses_annotations(self) -> bool:
        return self.groups is not None

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._prepare_fit(trainer)
        # masks exist (mode off) before any checkpoint is restored or DDP wraps the model; a checkpoint
        # of this stage that is validated or tested loads its masks (and their mode) into them
        attach_masks(pl_module, self.modules, self.init_logit, self.gumbel_temperature)

    def _prepare_fit(self, trainer: L.Trainer) -> None:
        """Checks the data and the strategy; points the datamodule at the split and groups to train on."""
        dm = require_group_datamodule(getattr(trainer, "datamodule", None), "MaskPruning")
        for name in ("split", "finetune_split"):
            if getattr(self, name) not in dm.splits:
                raise ShortcutError(
                    f"MaskPruning {name} {getattr(self, name)!r} is not in the data ({', '.join(dm.splits)})"
                )
        dm.train_split = self.split
        if self.groups is not None:
            bad = [g for g in self.groups if not 0 <= g < dm.num_groups]
            if bad:
                raise ShortcutError(
                    f"MaskPruning groups {bad} do not exist; the groups are "
                    + ", ".join(f"{i}={n}" for i, n in enumerate(dm.group_names))
                )
            dm.train_groups = self.groups
        n = len(dm.dataset(self.split))
        if self.num_clusters > n:
            raise ShortcutError(
                f"num_clusters={self.num_clusters} is more than the {n} samples of the {self.split} split"
            )
        self._check_strategy(trainer.strategy, trainer.world_size)

    @staticmethod
    def _check_strategy(strategy: Any, world_size: int) -> None:
        kwargs = getattr(strategy, "_ddp_kwargs", None)
        if world_size > 1 and kwargs is not None and not kwargs.get("find_unused_parameters", False):
            raise ShortcutError(
                "MaskPruning freezes the weights during fit, which plain DDP refuses: use "
                "strategy='ddp_find_unused_parameters_true' (or 'ddp_spawn_find_unused_parameters_true')"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.phase != "waiting":  # resumed: frozen weights, mask modes and the mask optimizer come back
            self._enter(trainer, pl_module, self.phase, resumed=True)
        elif trainer.current_epoch >= self.start_epoch:
            # before the training loader exists: with worker processes it draws its first epoch's order
            # when it starts, which is before on_train_epoch_start
            self._start(trainer, pl_module)
        if self.phase != "waiting":
            # a resumed run's epoch is restored after this hook: the split saved with the stage's state
            self._point_data(trainer, self.data_split or self.split)

    # -- phases ---------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.phase == "waiting" and epoch >= self.start_epoch:
            self._start(trainer, pl_module)
        elif self.phase == "learning" and epoch >= (self.started_epoch or 0) + self.prune_epochs:
            self._enter(trainer, pl_module, "fixed")
            self._log_densities(trainer, pl_module)
        if self._reload_every is not None:  # the loader of this epoch was rebuilt for the new split
            trainer.reload_dataloaders_every_n_epochs, self._reload_every = self._reload_every, None
        if self.phase != "waiting":
            self._point_data(trainer, self._split_of(epoch))
        self._hold_bn(pl_module)

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._cluster(trainer, pl_module)
        self.started_epoch = trainer.current_epoch
        self._enter(trainer, pl_module, "learning")

    def _split_of(self, epoch: int) -> str:
        """The split the trainer draws from in ``epoch`` of the stage: the masks', then the fine-tuning's."""
        learning = epoch < (self.started_epoch or 0) + self.prune_epochs
        return self.split if learning else self.finetune_split

    def _point_data(self, trainer: L.Trainer, split: str) -> None:
        """Points the datamodule at ``split``, cluster-balanced if it is the split that was clustered.

        Called before an epoch's loader is built (``on_fit_start``, or the end of the epoch before); a
        change of split makes Lightning rebuild the loader once (``reload_dataloaders_every_n_epochs``).
        """
        dm = trainer.datamodule
        self.data_split = split
        if split != dm.train_split:
            dm.train_split, dm.train_groups, dm.train_weights = split, None, None
            if trainer.train_dataloader is not None and self._reload_every is None:
                self._reload_every = trainer.reload_dataloaders_every_n_epochs
                trainer.reload_dataloaders_every_n_epochs = 1
            held_out = " (validation metrics from now on are on data it trains on)" if split == "val" else ""
            rank_zero_info(f"PruSC: the trainer now trains on the {split} split{held_out}")
        if split == self.split and self.cluster_balanced:
            self._balance_clusters(trainer)

    def _cluster_weights(self, dm: Any) -> Tensor:
        """Per-sample weights ``1 / size of its cluster`` over the split, the sizes counted where the sampler draws."""
        positions = dm.train_positions()
        drawn = self.clusters if positions is None else self.clusters[positions]
        counts = torch.bincount(drawn.clamp(min=0), minlength=self.num_clusters).double()
        labels = self.clusters.clamp(min=0)
        return torch.where(self.clusters >= 0, 1.0 / counts[labels].clamp(min=1), 0.0)

    def _balance_clusters(self, trainer: L.Trainer) -> None:
        """Cluster-balanced draws: the datamodule's weights for a loader yet to be built, and the live sampler's."""
        weights = self._cluster_weights(trainer.datamodule)
        trainer.datamodule.train_weights = weights
        loader = trainer.train_dataloader
        if loader is None:  # on_fit_start: the loader is built after it, from train_weights
            return
        sampler = getattr(loader, "sampler", None)
        if not isinstance(sampler, BalancedSampler):
            raise ShortcutError(
                "MaskPruning(cluster_balanced=True) needs the training loader of a shortcut_lightning datamodule "
                f"(its sampler is {type(sampler).__name__}); or set cluster_balanced: false"
            )
        sampler.reweight(weights)

    def _enter(
        self, trainer: L.Trainer, pl_module: L.LightningModule, phase: str, resumed: bool = False
    ) -> None:
        masks = model_masks(pl_module)
        if phase == "fixed" and not resumed:
            self._restore_best(masks)
            if self.target_density is not None:
                set_density(masks, self.target_density, self._reachable_weights(trainer, pl_module))
            rank_zero_info(f"PruSC: masks fixed, {_summary(self._densities(trainer, pl_module))}")
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
            self._recalibrate_bn(trainer, pl_module)
        if phase == "fixed" and not resumed and self.finetune_epochs > 0:
            # what the masks alone do, before the fine-tuning changes the weights
            dm = trainer.datamodule
            self.report["fixed"] = self._reports(pl_module, dm, find_head(pl_module), "masks fixed")

    def _hold_bn(self, pl_module: L.LightningModule) -> None:
        """BatchNorm in eval mode while the weights are frozen: statistics of the dense model, not of noisy masks."""
        if self.phase == "learning" or (self.phase == "fixed" and self.finetune_epochs == 0):
            for module in pl_module.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()

    @torch.no_grad()
    def _recalibrate_bn(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Re-estimates the BatchNorm statistics of the pruned network over the split (averaged over ranks)."""
        norms = [m for m in pl_module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        if not norms:
            return
        was_training = pl_module.training
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the pass
        pl_module.train()
        show = trainer.is_global_zero
        loader = trainer.datamodule.dataloader(self.split)
        for batch in tqdm(
            loader, desc="PruSC: BatchNorm statistics of the pruned model", leave=False, disable=not show
        ):
            pl_module(batch["image"].to(pl_module.device))
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
            if trainer.world_size > 1:
                m.running_mean.copy_(trainer.strategy.reduce(m.running_mean, reduce_op="mean"))
                m.running_var.copy_(trainer.strategy.reduce(m.running_var, reduce_op="mean"))
        pl_module.train(was_training)

    # -- clustering -----------------------------------------------------------------------------
    def _cluster(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        head = find_head(pl_module)
        tag = " [uses group annotations: groups]" if self.uses_annotations else ""
        embedded = collect_embeddings(
            pl_module, dm.dataloader(self.split), head, desc=f"PruSC: embedding {self.split}"
        )
        found = cosine_kmeans(embedded.features, self.num_clusters, seed=self.seed)
        clusters = torch.full((int(embedded.index.max()) + 1,), -1, dtype=torch.long)
        clusters[embedded.index] = found.labels
        self.clusters = clusters
        self._cluster_device = None
        self.report = {
            "uses_annotations": self.uses_annotations,
            "clusters": _cluster_table(found.labels, embedded.target, embedded.group, dm),
            "kmeans_inertia": found.inertia,
            "before": self._reports(pl_module, dm, head, "before"),
            "parameters": self._parameters(),
        }
        rank_zero_info(f"PruSC{tag}: {self.num_clusters} clusters of the {self.split} split (cosine k-means)")

    def _reports(self, pl_module: L.LightningModule, dm: Any, head: Any, when: str) -> dict[str, Any]:
        return group_reports(dm, embed_splits(pl_module, dm, head, self.report_splits, f"PruSC ({when}):"))

    # -- the loss -------------------------------------------------------------------------------
    def training_penalty(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, outputs: dict[str, Tensor]
    ) -> Tensor | None:
        if self.phase != "learning":
            return None
        if "features" not in outputs:
            raise ShortcutError(
                "MaskPruning needs the penultimate features of the training forward: pass "
                "{'features': features, 'logits': logits} to total_penalty in training_step"
            )
        sparsity = torch.stack([torch.sigmoid(m.logits).sum() for m in self._masks.values()]).sum()
        if self._cluster_device is None or self._cluster_device.device != outputs["features"].device:
            self._cluster_device = self.clusters.to(outputs["features"].device)
        clusters = self._cluster_device[batch["index"]]
        supcon = cluster_supcon(outputs["features"], batch["target"], clusters, self.temperature)
        n = len(batch["target"])
        pl_module.log("train/prusc/supcon", supcon.detach(), on_step=True, on_epoch=True, batch_size=n)
        pl_module.log("train/prusc/sparsity", sparsity.detach(), on_step=True, on_epoch=True, batch_size=n)
        return self.lambda_sparse * sparsity + self.beta * supcon

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        """Steps the mask logits with this stage's own Adam, whatever optimizer the module uses.

        The logits are created after DDP wraps the model, so their gradients are averaged over the
        ranks here (the strategy's ``reduce``). A step with a non-finite gradient (e.g. an AMP
        overflow) is skipped, as the module's optimizer skips it.
        """
        if self.phase != "learning" or self._optimizer is None:
            return
        logits = [m.logits for m in self._masks.values() if m.logits.grad is not None]
        if not logits:
            return
        flat = torch.cat([p.grad.flatten() for p in logits])
        if trainer.world_size > 1:
            flat = trainer.strategy.reduce(flat, reduce_op="mean")
            offset = 0
            for p in logits:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
                offset += p.numel()
        if bool(torch.isfinite(flat).all()):
            self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.phase == "waiting":
            return
        self._log_densities(trainer, pl_module)
        last = (self.started_epoch or 0) + self.prune_epochs + self.finetune_epochs - 1
        if trainer.current_epoch >= last:  # the stage is complete: nothing is left to train
            trainer.should_stop = True
        elif self._split_of(trainer.current_epoch + 1) != self.data_split:
            self._point_data(trainer, self._split_of(trainer.current_epoch + 1))  # before its loader is built

    def _reachable_weights(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Tensor]:
        """The conv taps that can read a pixel of the split's images (found once, from one image)."""
        if self._reachable is None:
            image = trainer.datamodule.dataset(self.split)[0]["image"]
            self._reachable = reachable_weights(pl_module, image[None].to(pl_module.device))
        return self._reachable

    def _densities(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        return densities(pl_module, self._reachable_weights(trainer, pl_module))

    def _log_densities(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name, value in self._densities(trainer, pl_module).items():
            key = name if name.startswith("Prune_") else f"density/{name}"
            pl_module.log(f"prune/{key}", value, on_epoch=True, rank_zero_only=True)

    # -- the best epoch -------------------------------------------------------------------------
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """With ``monitor``: keeps the mask logits of the best mask-learning epoch so far."""
        if self.monitor is None or self.phase != "learning" or trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            found = ", ".join(sorted(k for k in trainer.callback_metrics if k.startswith("val/"))) or "none"
            raise ShortcutError(
                f"MaskPruning monitor {self.monitor!r} was not logged in validation (logged: {found}); "
                "set monitor to one of them, e.g. val/worst_class"
            )
        score = float(value)
        if self.best is not None:
            better = score > self.best["score"] if self.mode == "max" else score < self.best["score"]
            if not better:
                return
        logits = {name: m.logits.detach().to("cpu", copy=True) for name, m in self._masks.items()}
        self.best = {"epoch": trainer.current_epoch, "score": score, "logits": logits}

    def _restore_best(self, masks: dict[str, Any]) -> None:
        """Puts the best epoch's mask logits back (``monitor``); says so, or that there was none."""
        if self.monitor is None:
            return
        if self.best is None:
            rank_zero_info(
                f"PruSC: {self.monitor} was never validated during mask learning; the last masks are kept"
            )
            return
        with torch.no_grad():
            for name, mask in masks.items():
                mask.logits.copy_(self.best["logits"][name])
        # restored: the copy (one float per weight) would only weigh down every later checkpoint
        self.best["logits"] = None
        self.report["best"] = {
            "monitor": self.monitor,
            "epoch": self.best["epoch"],
            "score": self.best["score"],
        }
        rank_zero_info(
            f"PruSC: the masks of epoch {self.best['epoch']} are kept ({self.monitor} {self.best['score']:.4f})"
        )

    # -- the end --------------------------------------------------------------------------------
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.phase == "waiting":
            rank_zero_info(f"PruSC: the fit ended before start_epoch {self.start_epoch}; nothing was pruned")
            return
        if self.phase == "learning":
            self._enter(trainer, pl_module, "fixed")
        dm = trainer.datamodule
        self.report["densities"] = self._densities(trainer, pl_module)
        self.report["after"] = self._reports(pl_module, dm, find_head(pl_module), "after")
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank asks
        if self.export:
            bake_masks(pl_module)
            for param in pl_module.parameters():
                param.requires_grad_(True)
            if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
                trainer.save_checkpoint(Path(trainer.checkpoint_callback.dirpath) / "pruned.ckpt")
        self._write(log_dir)

    @rank_zero_only
    def _write(self, log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "prusc.json").write_text(json.dumps(self.report, indent=2))
        tag = " [uses group annotations]" if self.uses_annotations else ""
        print(f"\nPruSC{tag}: {_summary(self.report['densities'])}", flush=True)
        for split, before in self.report["before"].items():
            columns = {"before": before}
            if "fixed" in self.report:  # fine-tuned after the masks were fixed
                columns.update(pruned=self.report["fixed"][split], tuned=self.report["after"][split])
            else:
                columns["pruned"] = self.report["after"][split]
            table = format_group_table(columns)
            print(f"\n{table}\n", flush=True)

    def _parameters(self) -> dict[str, Any]:
        keys = ("start_epoch", "prune_epochs", "finetune_epochs", "finetune_split", "num_clusters", "modules", "lambda_sparse", "beta",
                "temperature", "gumbel_temperature", "init_logit", "mask_lr", "target_density", "monitor", "mode", "split", "cluster_balanced", "recalibrate_bn", "groups",
                "seed", "export")  # fmt: skip
        return {k: getattr(self, k) for k in keys}

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "started_epoch": self.started_epoch,
            "clusters": self.clusters,
            "report": self.report,
            "optimizer": None if self._optimizer is None else self._optimizer.state_dict(),
            "best": self.best,
            "data_split": self.data_split,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.phase = state_dict.get("phase", "waiting")
        self.started_epoch = state_dict.get("started_epoch")
        self.clusters = state_dict.get("clusters")
        self.report = state_dict.get("report", {})
        self._optimizer_state = state_dict.get("optimizer")
        self.best = state_dict.get("best")
        self.data_split = state_dict.get("data_split")


def _summary(found: dict[str, float]) -> str:
    text = f"Prune_f {found['Prune_f']:.3f}, Prune_h {found['Prune_h']:.3f}"
    if "Prune_f_reachable" in found:
        text += f", Prune_f of the weights that reach an image pixel {found['Prune_f_reachable']:.3f}"
    return text


def _cluster_table(labels: Tensor, target: Tensor, group: Tensor, dm: Any) -> list[dict[str, Any]]:
    """Size, classes and (for the report only) groups of every cluster."""
    rows = []
    for k in range(int(labels.max()) + 1):
        member = labels == k
        row: dict[str, Any] = {"cluster": k, "n": int(member.sum())}
        row["classes"] = {dm.class_names[c]: int((target[member] == c).sum()) for c in range(dm.num_classes)}
        if (group >= 0).all():
            row["groups"] = {dm.group_names[g]: int((group[member] == g).sum()) for g in range(dm.num_groups)}
        rows.append(row)
    return rows
