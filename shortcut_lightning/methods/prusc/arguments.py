"""``MaskPruning``'s arguments as one typed, validated object, and the checks of the data and trainer they need.

Each error names the argument and the fix. ``MaskPruning.__init__`` keeps its keyword arguments (the CLI reads
its signature and docstring) and builds a :class:`PruSCConfig` from them, so the defaults live in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from shortcut_lightning.data.base import TRAIN_SPLITS
from shortcut_lightning.errors import ShortcutError
from shortcut_lightning.methods.prusc.clusters import ClusterWithin
from shortcut_lightning.methods.prusc.masks import Sparsity

TrainSplit = Literal["train", "val"]
Mode = Literal["max", "min"]  # which monitor value is best
BatchNorm = Literal["held", "batch"]  # BatchNorm while the masks learn
# the model a fine-tuning ends with: its last epoch, or the best validated
FinetuneKeep = Literal["last", "best"]


@dataclass(frozen=True)
class PruSCConfig:
    """What ``MaskPruning`` was asked to do, checked when built (``MaskPruning``'s docstring explains each field).

    ``finetune_split`` is as given (``None``: the fine-tuning trains on ``split``, see :attr:`finetune_on`);
    ``groups`` and ``report_splits`` are normalised to a list of ints and a tuple.
    """

    start_epoch: int
    prune_epochs: int
    finetune_epochs: int
    finetune_split: TrainSplit | None
    num_clusters: int
    cluster_layer: str | None
    cluster_within: ClusterWithin
    modules: list[str] | None
    lambda_sparse: float
    beta: float
    temperature: float
    gumbel_temperature: float
    init_logit: float
    mask_lr: float
    target_density: float | None
    monitor: str | None
    keep_dense: bool
    finetune_keep: FinetuneKeep
    mode: Mode
    split: TrainSplit
    cluster_balanced: bool
    recalibrate_bn: bool
    batchnorm: BatchNorm
    sparsity: Sparsity
    groups: list[int] | None
    seed: int
    export: bool
    report_splits: tuple[str, ...]

    @classmethod
    def of(cls, arguments: Mapping[str, Any]) -> PruSCConfig:
        """The config of ``arguments`` (e.g. ``MaskPruning.__init__``'s ``locals()``): its fields, by name."""
        return cls(**{f.name: arguments[f.name] for f in fields(cls)})

    def __post_init__(self) -> None:
        self._check()
        if self.groups is not None:
            object.__setattr__(self, "groups", [int(g) for g in self.groups])
        object.__setattr__(self, "report_splits", tuple(self.report_splits))

    @property
    def finetune_on(self) -> str:
        """The split of the fine-tuning epochs: ``finetune_split``, else ``split``."""
        return self.finetune_split or self.split

    def parameters(self) -> dict[str, Any]:
        """What ``prusc.json`` records as the stage's parameters: every field but ``report_splits``, with the
        fine-tuning's split resolved."""
        found = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "report_splits"}
        return {**found, "finetune_split": self.finetune_on}

    def inert(self) -> tuple[str, ...]:
        """The arguments whose values change nothing with these settings: without a mask epoch
        (``prune_epochs`` 0) no mask logit is stepped, so ``mask_lr`` is unused, and every mask stays
        ``1[init_logit > 0]``, so only ``init_logit``'s sign counts. A run cache may leave these out of its key
        (``bench/resolved_config.py``); ``tests/test_prusc_stage.py`` checks that they are inert."""
        if self.prune_epochs == 0 and self.init_logit > 0:
            return ("mask_lr", "init_logit")
        return ("mask_lr",) if self.prune_epochs == 0 else ()

    def _check(self) -> None:
        """Raises :class:`ShortcutError` for the first argument that cannot work."""
        if self.prune_epochs < 1 and not (self.prune_epochs == 0 and self.finetune_epochs > 0):
            raise ShortcutError(
                "prune_epochs must be >= 1, or 0 with finetune_epochs >= 1 (fine-tuning on the clusters alone), "
                f"got prune_epochs={self.prune_epochs}, finetune_epochs={self.finetune_epochs}"
            )
        for name in ("finetune_epochs", "start_epoch"):
            if getattr(self, name) < 0:
                raise ShortcutError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_clusters < 2:
            raise ShortcutError(
                f"num_clusters must be >= 2 (SupCon needs other clusters), got {self.num_clusters}"
            )
        if self.target_density is not None and not 0 < self.target_density < 1:
            raise ShortcutError(
                f"target_density must be between 0 and 1 (exclusive), got {self.target_density}: 0 prunes "
                "everything, 1 nothing"
            )
        if self.mode not in get_args(Mode):
            raise ShortcutError(f"mode must be 'max' or 'min', got {self.mode!r}")
        for name, value in (("split", self.split), ("finetune_split", self.finetune_on)):
            if value not in TRAIN_SPLITS:
                raise ShortcutError(f"{name} must be 'train' or 'val', got {value!r}")
        if self.finetune_split is not None and self.finetune_epochs == 0:
            raise ShortcutError(
                f"finetune_split {self.finetune_split!r} needs finetune_epochs >= 1 (there is nothing to fine-tune)"
            )
        for name, allowed in (
            ("batchnorm", BatchNorm),
            ("sparsity", Sparsity),
            ("cluster_within", ClusterWithin),
            ("finetune_keep", FinetuneKeep),
        ):
            if getattr(self, name) not in get_args(allowed):
                choices = ", ".join(map(repr, get_args(allowed)))
                raise ShortcutError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.finetune_keep == "best" and (self.monitor is None or self.finetune_epochs == 0):
            raise ShortcutError(
                "finetune_keep 'best' needs a monitor (e.g. val/worst_class) and finetune_epochs >= 1, got "
                f"monitor={self.monitor!r}, finetune_epochs={self.finetune_epochs}"
            )
        for name in ("lambda_sparse", "beta"):
            if getattr(self, name) < 0:
                raise ShortcutError(f"{name} must be >= 0, got {getattr(self, name)}")

    def check_data(self, dm: Any) -> None:
        """The splits and groups must exist in the data, and the split must hold ``num_clusters`` samples."""
        for name, value in (("split", self.split), ("finetune_split", self.finetune_on)):
            if value not in dm.splits:
                raise ShortcutError(
                    f"MaskPruning {name} {value!r} is not in the data ({', '.join(dm.splits)})"
                )
        bad = [g for g in self.groups or [] if not 0 <= g < dm.num_groups]
        if bad:
            raise ShortcutError(
                f"MaskPruning groups {bad} do not exist; the groups are "
                + ", ".join(f"{i}={n}" for i, n in enumerate(dm.group_names))
            )
        n = len(dm.dataset(self.split))
        if self.num_clusters > n:
            raise ShortcutError(
                f"num_clusters={self.num_clusters} is more than the {n} samples of the {self.split} split"
            )


def check_strategy(strategy: Any, world_size: int) -> None:
    """Mask learning freezes the weights: under DDP the strategy must allow parameters without gradients."""
    kwargs = getattr(strategy, "_ddp_kwargs", None)
    if world_size > 1 and kwargs is not None and not kwargs.get("find_unused_parameters", False):
        raise ShortcutError(
            "MaskPruning freezes the weights during fit, which plain DDP refuses: use "
            "strategy='ddp_find_unused_parameters_true' (or 'ddp_spawn_find_unused_parameters_true')"
        )
