"""``SyntheticShortcuts``: the embedded benchmark, generated on the fly, with ground-truth masks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shortcut_lightning.data.base import GroupDataModule
from shortcut_lightning.data.datasets import GroupDataset, TensorImageDataset
from shortcut_lightning.data.synthetic_render import SPURIOUS_KINDS, render_split
from shortcut_lightning.data.transforms import tensor_transform
from shortcut_lightning.errors import DataError

_SPURIOUS_NAMES = {
    "background": ("land", "water"),
    "patch": ("no_patch", "patch"),
    "both": ("land", "land_patch", "water", "water_patch"),
}


class SyntheticShortcuts(GroupDataModule):
    """Waterbirds-like and ISIC-like shortcuts, procedurally drawn from a seed; nothing is downloaded.

    Class ``backslash`` vs ``slash``: the orientation of an elongated object of random colour, size and
    place (the core feature). Spurious attributes: ``background`` (land blotches vs water waves,
    Waterbirds-like, group id ``2 y + water``), ``patch`` (a striped colour-calibration patch in a
    corner, ISIC-like: it appears on class 0 only in training, never on class 1 by default) or
    ``both`` (``spurious = 2 water + patch``). Validation and test draw every attribute independently
    of the class (balanced within each class), as the Waterbirds and ISIC test sets do. Every sample
    carries a mask of its spurious region (background outside the object, and/or the patch).

    Args:
        spurious: ``background`` | ``patch`` | ``both``.
        minority_share: share of each class drawn on the other class's background in train
            (Waterbirds: 0.05; the default 0.03 makes the shortcut dominant for a CNN trained from scratch).
        patch_share: share of class-0 training images with a patch (ISIC: about half of benign).
        patch_minority_share: share of class-1 training images with a patch (ISIC: 0).
        class_share: share of class 1 in every split (Waterbirds: about a quarter are waterbirds).
        n_train, n_val, n_test: split sizes.
        core_noise: standard deviation (radians) of the object's angle around +-45 degrees.
        pixel_noise: standard deviation of additive pixel noise (images in [0, 1]).
        augment: random shifts of training images (no flips: they would change the class).
        data_seed: seed of the images; a split is a pure function of the arguments.

    Example::

        dm = SyntheticShortcuts(spurious="patch", image_size=32, n_train=256)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        batch["image"].shape, batch["mask"].shape, dm.group_names
    """

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        sampler: str = "default",
        seed: int = 0,
        spurious: str = "background",
        minority_share: float = 0.03,
        patch_share: float = 0.5,
        patch_minority_share: float = 0.0,
        class_share: float = 0.25,
        n_train: int = 3000,
        n_val: int = 1000,
        n_test: int = 2000,
        core_noise: float = 0.3,
        pixel_noise: float = 0.03,
        augment: bool = False,
        data_seed: int = 0,
        train_split: str = "train",
    ) -> None:
        super().__init__(root, image_size, batch_size, num_workers, sampler, seed, train_split)
        if spurious not in SPURIOUS_KINDS:
            raise DataError(
                f"data.spurious {spurious!r} is unknown: choose one of {', '.join(SPURIOUS_KINDS)}"
            )
        for name, value in (
            ("minority_share", minority_share),
            ("patch_share", patch_share),
            ("patch_minority_share", patch_minority_share),
            ("class_share", class_share),
        ):
            if not 0.0 <= value <= 1.0:
                raise DataError(f"data.{name} must lie in [0, 1], got {value}")
        if not 0.0 < class_share < 1.0:
            raise DataError(
                f"data.class_share must lie strictly between 0 and 1 (both classes), got {class_share}"
            )
        for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if value < 1:
                raise DataError(f"data.{name} must be at least 1, got {value}")
        self.spurious = spurious
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.train_rates = {
            "background": (minority_share, 1.0 - minority_share),
            "patch": (patch_share, patch_minority_share),
        }
        self.class_share = class_share
        self.core_noise = core_noise
        self.pixel_noise = pixel_noise
        self.augment = augment
        self.data_seed = data_seed
        self._rendered: dict[str, tuple[torch.Tensor, ...]] = {}

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", "val", "test")

    @property
    def class_names(self) -> Sequence[str]:
        return ("backslash", "slash")

    @property
    def spurious_names(self) -> Sequence[str]:
        return _SPURIOUS_NAMES[self.spurious]

    def _render(self, split: str) -> tuple[torch.Tensor, ...]:
        if split not in self._rendered:
            rates = self.train_rates if split == "train" else {"background": (0.5, 0.5), "patch": (0.5, 0.5)}
            r = render_split(
                self.sizes[split],
                self.spurious,
                self.image_size,
                rates,
                self.class_share,
                self.core_noise,
                self.pixel_noise,
                seed=self.data_seed * 1000 + ("train", "val", "test").index(split),
            )
            self._rendered[split] = tuple(
                torch.from_numpy(a) for a in (r.images, r.masks, r.targets, r.spurious)
            )
        return self._rendered[split]

    def make_dataset(self, split: str, augment: bool) -> GroupDataset:
        images, masks, targets, spurious = self._render(split)
        return TensorImageDataset(
            images,
            masks,
            targets=targets,
            spurious=spurious,
            n_spurious=self.n_spurious,
            transform=tensor_transform(self.image_size, augment and self.augment),
        )
