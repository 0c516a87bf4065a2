"""The bad-input rules of ``MaskPruning``'s arguments and trainer: each error names the argument and the fix."""

from __future__ import annotations

from typing import Any

from shortcut_lightning.data.base import TRAIN_SPLITS
from shortcut_lightning.errors import ShortcutError
from shortcut_lightning.methods.prusc.clusters import CLUSTER_WITHIN
from shortcut_lightning.methods.prusc.masks import SPARSITY_FORMS

BATCHNORM_MODES = ("held", "batch")
FINETUNE_KEEP = ("last", "best")  # the model a fine-tuning ends with: its last epoch, or the best validated


def check_arguments(
    start_epoch: int,
    prune_epochs: int,
    finetune_epochs: int,
    finetune_split: str | None,
    num_clusters: int,
    target_density: float | None,
    mode: str,
    split: str,
    lambda_sparse: float,
    beta: float,
    batchnorm: str = "held",
    sparsity: str = "probability",
    cluster_within: str = "split",
    finetune_keep: str = "last",
    monitor: str | None = None,
) -> None:
    """Raises :class:`ShortcutError` for the first argument of ``MaskPruning`` that cannot work."""
    if prune_epochs < 1 and not (prune_epochs == 0 and finetune_epochs > 0):
        raise ShortcutError(
            f"prune_epochs must be >= 1, or 0 with finetune_epochs >= 1 (fine-tuning on the clusters alone), "
            f"got prune_epochs={prune_epochs}, finetune_epochs={finetune_epochs}"
        )
    for name, value in (("finetune_epochs", finetune_epochs), ("start_epoch", start_epoch)):
        if value < 0:
            raise ShortcutError(f"{name} must be >= 0, got {value}")
    if num_clusters < 2:
        raise ShortcutError(f"num_clusters must be >= 2 (SupCon needs other clusters), got {num_clusters}")
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
    for name, value, allowed in (
        ("batchnorm", batchnorm, BATCHNORM_MODES),
        ("sparsity", sparsity, SPARSITY_FORMS),
        ("cluster_within", cluster_within, CLUSTER_WITHIN),
        ("finetune_keep", finetune_keep, FINETUNE_KEEP),
    ):
        if value not in allowed:
            raise ShortcutError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    if finetune_keep == "best" and (monitor is None or finetune_epochs == 0):
        raise ShortcutError(
            "finetune_keep 'best' needs a monitor (e.g. val/worst_class) and finetune_epochs >= 1, got "
            f"monitor={monitor!r}, finetune_epochs={finetune_epochs}"
        )
    for name, value in (("lambda_sparse", lambda_sparse), ("beta", beta)):
        if value < 0:
            raise ShortcutError(f"{name} must be >= 0, got {value}")


def check_data(dm: Any, split: str, finetune_split: str, groups: list[int] | None, num_clusters: int) -> None:
    """The splits and groups must exist in the data, and the split must hold ``num_clusters`` samples."""
    for name, value in (("split", split), ("finetune_split", finetune_split)):
        if value not in dm.splits:
            raise ShortcutError(f"MaskPruning {name} {value!r} is not in the data ({', '.join(dm.splits)})")
    bad = [g for g in groups or [] if not 0 <= g < dm.num_groups]
    if bad:
        raise ShortcutError(
            f"MaskPruning groups {bad} do not exist; the groups are "
            + ", ".join(f"{i}={n}" for i, n in enumerate(dm.group_names))
        )
    n = len(dm.dataset(split))
    if num_clusters > n:
        raise ShortcutError(f"num_clusters={num_clusters} is more than the {n} samples of the {split} split")


def check_strategy(strategy: Any, world_size: int) -> None:
    """Mask learning freezes the weights: under DDP the strategy must allow parameters without gradients."""
    kwargs = getattr(strategy, "_ddp_kwargs", None)
    if world_size > 1 and kwargs is not None and not kwargs.get("find_unused_parameters", False):
        raise ShortcutError(
            "MaskPruning freezes the weights during fit, which plain DDP refuses: use "
            "strategy='ddp_find_unused_parameters_true' (or 'ddp_spawn_find_unused_parameters_true')"
        )
