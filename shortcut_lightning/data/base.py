"""The datamodule contract every stage relies on: groups, counts and plain passes over a split."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Sampler

from shortcut_lightning.data.datasets import GroupDataset
from shortcut_lightning.data.samplers import SAMPLERS, BalancedSampler, EvalShardSampler
from shortcut_lightning.errors import DataError, ShortcutError

SPLITS = ("train", "val", "test")
TRAIN_SPLITS = ("train", "val")  # never the test split
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
# where spurious-region masks come from, for the errors of the stages that need them
MASK_SOURCES = "MetadataDataModule reads them from a mask_filename column (docs/datasets.md); SyntheticShortcuts has them"


def require_group_datamodule(datamodule: Any, stage: str) -> GroupDataModule:
    """The datamodule a stage makes its own passes with; it must be one of ours (named splits, groups)."""
    if not isinstance(datamodule, GroupDataModule):
        raise ShortcutError(
            f"{stage} needs a datamodule of shortcut_lightning.data (it makes its own passes over named splits "
            f"and labels samples by group); got {type(datamodule).__name__}"
        )
    return datamodule


class GroupDataModule(L.LightningDataModule):
    """Base of our datamodules: labelled splits with ``group = target * n_spurious + spurious``.

    Subclasses implement :meth:`make_dataset`, :attr:`splits`, :attr:`class_names` and
    :attr:`spurious_names`. Everything else (loaders, samplers, counts, checks) lives here.

    Args:
        root: folder that holds the data (unused by generated data).
        image_size: side of the square images fed to the model.
        batch_size: samples per batch, for every split.
        num_workers: DataLoader worker processes.
        sampler: training sampler, ``default`` (shuffle), ``class_balanced`` or ``group_balanced``.
        seed: seed of the training sampler's per-epoch draws.
        train_split: the split ``fit`` trains on: ``train``, or ``val`` to retrain a loaded model on
            held-out data with class labels only (the retraining control of docs/results.md). A stage
            that chooses its own split (``MaskPruning``) overrides it.
    """

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 0,
        sampler: str = "default",
        seed: int = 0,
        train_split: str = "train",
    ) -> None:
        super().__init__()
        for name, value, choices in (
            ("sampler", sampler, SAMPLERS),
            ("train_split", train_split, TRAIN_SPLITS),
        ):
            if value not in choices:
                raise DataError(f"data.{name} {value!r} is unknown: choose one of {', '.join(choices)}")
        for name, value, low in (
            ("image_size", image_size, 8),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
        ):
            if value < low:
                raise DataError(f"data.{name} must be at least {low}, got {value}")
        self.root = root
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.sampler = sampler
        self.seed = seed
        self._datasets: dict[tuple[str, bool], GroupDataset] = {}
        self._checked = False
        # what the trainer trains on; a stage changes it through :meth:`train_on`, before the training loader
        # is built (MaskPruning: split and groups in its ``setup`` hook, cluster-balance weights in ``on_fit_start``)
        self.train_split = train_split
        self._train_groups: list[int] | None = None
        self._train_weights: torch.Tensor | None = None  # per-sample draw weights over train_split
        self._train_repeats: torch.Tensor | None = None  # per-sample counts of an upsampled epoch

    # -- what the trainer trains on ---------------------------------------------------------------
    def train_on(
        self,
        split: str,
        groups: Sequence[int] | None = None,
        weights: torch.Tensor | None = None,
        repeats: torch.Tensor | None = None,
    ) -> None:
        """The contract through which a stage chooses the training data of the loaders built from now on.

        ``split``: ``train`` or ``val``; ``groups``: train on these group ids only (uses annotations);
        ``weights``: per-sample draw weights over ``split`` (indexed by sample position), e.g. cluster balance;
        ``repeats``: per-sample counts over ``split`` instead: an epoch holds sample ``i`` ``repeats[i]`` times.
        """
        if split not in TRAIN_SPLITS or split not in self.splits:
            raise DataError(
                f"cannot train on split {split!r}: choose one of {', '.join(s for s in TRAIN_SPLITS if s in self.splits)}"
            )
        if groups is not None:
            bad = [g for g in groups if not 0 <= g < self.num_groups]
            if bad:
                raise DataError(
                    f"groups {bad} do not exist; the groups are "
                    + ", ".join(f"{i}={n}" for i, n in enumerate(self.group_names))
                )
        for what, values in (("draw weights", weights), ("repeat counts", repeats)):
            if values is not None and len(values) != len(self.dataset(split)):
                raise DataError(
                    f"{len(values)} {what} for the {len(self.dataset(split))} samples of the {split} split"
                )
        if weights is not None and repeats is not None:
            raise DataError("train_on takes draw weights or repeat counts, not both")
        if repeats is not None and (repeats < 0).any():
            raise DataError("repeat counts must be >= 0")
        self.train_split = split
        self._train_groups = None if groups is None else [int(g) for g in groups]
        self._train_weights = weights
        self._train_repeats = repeats

    def reweight(self, weights: torch.Tensor, who: str) -> None:
        """Per-sample draw weights over :attr:`train_split` for the loaders built from now on and for the live
        one, whose sampler draws by them from its next epoch on (``who`` names the stage in the error)."""
        self.train_on(self.train_split, groups=self.train_groups, weights=weights)
        loader = None if self.trainer is None else self.trainer.train_dataloader
        if loader is None:  # before fit's loader exists: it is built from these weights
            return
        sampler = getattr(loader, "sampler", None)
        if not isinstance(sampler, BalancedSampler):
            raise DataError(
                f"{who} reweights the training data, which needs the training loader of a shortcut_lightning "
                f"datamodule (its sampler is {type(sampler).__name__})"
            )
        sampler.reweight(weights)

    def upsample(self, repeats: torch.Tensor, who: str) -> None:
        """Epochs that hold each sample of :attr:`train_split` ``repeats[i]`` times (JTT's upsampled set), for
        the loaders built from now on. An epoch's length changes with it, so a live loader cannot take it:
        the trainer must rebuild its loaders every epoch (``who`` names the stage in the error)."""
        trainer = self.trainer
        live = trainer is not None and trainer.train_dataloader is not None
        if live and trainer.reload_dataloaders_every_n_epochs != 1:
            raise DataError(
                f"{who} upsamples the training data mid-fit, which changes the epoch's length: give "
                "trainer.reload_dataloaders_every_n_epochs: 1 (or upsample before the fit starts)"
            )
        self.train_on(self.train_split, groups=self.train_groups, repeats=repeats)

    @property
    def train_groups(self) -> list[int] | None:
        """The group ids the training loader draws from (``None``: all); set by :meth:`train_on`."""
        return self._train_groups

    @property
    def train_weights(self) -> torch.Tensor | None:
        """Per-sample draw weights over :attr:`train_split` (``None``: the sampler's own); set by :meth:`train_on`."""
        return self._train_weights

    @property
    def train_repeats(self) -> torch.Tensor | None:
        """Per-sample counts of an upsampled epoch over :attr:`train_split` (``None``: none); set by :meth:`train_on`."""
        return self._train_repeats

    # -- what a subclass provides ---------------------------------------------------------------
    @property
    def splits(self) -> tuple[str, ...]:
        """Splits that hold samples, among ``train``, ``val``, ``test``."""
        raise NotImplementedError

    @property
    def class_names(self) -> Sequence[str]:
        raise NotImplementedError

    @property
    def spurious_names(self) -> Sequence[str]:
        raise NotImplementedError

    def make_dataset(self, split: str, augment: bool) -> GroupDataset:
        raise NotImplementedError

    # -- derived facts --------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def n_spurious(self) -> int:
        return len(self.spurious_names)

    @property
    def num_groups(self) -> int:
        return self.num_classes * self.n_spurious

    @property
    def group_names(self) -> list[str]:
        """``<class>_<spurious>`` for every group id, in id order."""
        return [f"{c}_{s}" for c in self.class_names for s in self.spurious_names]

    @property
    def has_masks(self) -> bool:
        return self.dataset("train" if "train" in self.splits else self.splits[0]).has_masks

    def dataset(self, split: str, augment: bool = False) -> GroupDataset:
        """The dataset of ``split`` (cached), with training or evaluation transforms."""
        if split not in self.splits:
            raise DataError(f"split {split!r} is not in this dataset; it has {', '.join(self.splits)}")
        key = (split, augment)
        if key not in self._datasets:
            self._datasets[key] = self.make_dataset(split, augment)
        return self._datasets[key]

    def group_counts(self, split: str) -> torch.Tensor:
        """Samples per group id in ``split`` (zeros for absent groups)."""
        return torch.bincount(self.dataset(split).groups, minlength=self.num_groups)

    # -- loaders --------------------------------------------------------------------------------
    def dataloader(
        self,
        split: str,
        augment: bool = False,
        shuffle: bool = False,
        sampler: Sampler | None = None,
        drop_last: bool = False,
    ) -> DataLoader:
        """A loader over ``split``. Unshuffled loaders shard across DDP ranks without repeats."""
        ds = self.dataset(split, augment)
        if sampler is None:
            sampler = (
                BalancedSampler(ds.targets, ds.groups, seed=self.seed)
                if shuffle
                else EvalShardSampler(len(ds))
            )
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=drop_last,
        )

    def train_positions(self) -> torch.Tensor | None:
        """The positions of :attr:`train_split` the training sampler draws from: those of :attr:`train_groups`, or all (``None``)."""
        if self.train_groups is None:
            return None
        groups = self.dataset(self.train_split, augment=True).groups
        subset = torch.isin(groups, torch.tensor(self.train_groups)).nonzero().flatten()
        if len(subset) == 0:
            raise DataError(
                f"train_groups {self.train_groups} have no samples in the {self.train_split} split "
                f"(groups: {', '.join(f'{i}={n}' for i, n in enumerate(self.group_names))})"
            )
        return subset

    def train_dataloader(self) -> DataLoader:
        """Batches of :attr:`train_split` (``train`` unless a stage chose another through :meth:`train_on`), of
        :attr:`train_groups` only if set, drawn by :attr:`train_weights` or upsampled by :attr:`train_repeats` if set."""
        ds = self.dataset(self.train_split, augment=True)
        sampler = BalancedSampler(
            ds.targets,
            ds.groups,
            self.sampler,
            self.seed,
            self.train_positions(),
            self.train_weights,
            self.train_repeats,
        )
        if self.trainer is not None:
            # Lightning sets the epoch (its count of processed epochs) after it starts the loader's iterator,
            # which with worker processes draws the order: a resumed run would replay epoch 0's order
            # (Lightning issue #21938)
            sampler.set_epoch(self.trainer.fit_loop.epoch_progress.current.processed)
        # a last batch of one sample breaks BatchNorm in training (upsampled epochs have any length): dropped
        lone = len(sampler) % self.batch_size == 1 and len(sampler) > 1
        return self.dataloader(self.train_split, augment=True, sampler=sampler, drop_last=lone)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    # -- checks ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.train_split != "train":
            rank_zero_warn(
                f"data.train_split is {self.train_split!r}: the model trains on that split, so its validation "
                "metrics and the best checkpoint measure data it trains on; read the test table"
            )
        if stage == "fit" and self.train_split in self.splits:
            only = self._only_class(self.train_split, augment=True)  # the dataset training reads
            if only is not None:
                raise DataError(
                    f"the {self.train_split} split holds only class {only!r}: training needs at least two classes; "
                    "check the split and class columns of the data (see docs/datasets.md)"
                )
        if self._checked:
            return
        for split in STAGE_SPLITS[stage]:
            if split not in self.splits:
                raise DataError(
                    f"`{stage}` needs a {split!r} split but the data has only {', '.join(self.splits)}; "
                    "see docs/datasets.md for the split column"
                )
        for split in ("val", "test"):
            if split not in self.splits:
                continue
            only = self._only_class(split)
            if only is not None:
                rank_zero_warn(
                    f"the {split} split holds only class {only!r}: its metrics are defined but measure that class "
                    f"alone; add samples of the other classes to {split} to evaluate them"
                )
            counts = self.group_counts(split)
            empty = [self.group_names[g] for g in range(self.num_groups) if counts[g] == 0]
            if empty:
                rank_zero_warn(
                    f"group(s) {', '.join(empty)} have no samples in the {split} split: worst-group accuracy "
                    f"skips them; add samples of those groups to {split} to evaluate them"
                )
        self._checked = True

    def _only_class(self, split: str, augment: bool = False) -> str | None:
        """The name of the one class ``split`` holds, or None when it holds several."""
        present = torch.unique(self.dataset(split, augment).targets)
        return self.class_names[int(present[0])] if len(present) == 1 else None

    def state_dict(self) -> dict:
        return {}
