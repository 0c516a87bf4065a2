"""Map-style datasets that return the sample dict of the data contract.

``{"image", "target", "group", "spurious", "index"}`` plus ``"mask"`` (bool [1,H,W], the spurious
region) when the dataset has masks. ``group = target * n_spurious + spurious``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from shortcut_lightning.data.file_reader import FileReader


class GroupDataset(Dataset):
    """Labels shared by every dataset of ours; subclasses say how to load image ``i`` and its mask."""

    def __init__(
        self,
        targets: torch.Tensor,
        spurious: torch.Tensor,
        n_spurious: int,
        transform: Callable[..., Any],
        has_masks: bool,
    ) -> None:
        self.targets = targets.long()
        self.spurious = spurious.long()
        self.n_spurious = n_spurious
        self.groups = self.targets * n_spurious + self.spurious
        self.transform = transform
        self.has_masks = has_masks

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, i: int) -> tuple[tv_tensors.Image, tv_tensors.Mask | None]:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, mask = self.load(i)
        sample: dict[str, Any] = {
            "target": int(self.targets[i]),
            "group": int(self.groups[i]),
            "spurious": int(self.spurious[i]),
            "index": i,
        }
        if mask is None:
            sample["image"] = self.transform(image)
        else:
            image, mask = self.transform(image, mask)
            sample["image"], sample["mask"] = image, mask.as_subclass(torch.Tensor).bool()
        sample["image"] = sample["image"].as_subclass(torch.Tensor)
        return sample


class TensorImageDataset(GroupDataset):
    """Images and masks held in memory as uint8 [N,3,H,W] and bool [N,1,H,W] tensors."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor | None, **labels: Any) -> None:
        super().__init__(has_masks=masks is not None, **labels)
        self.images = images
        self.masks = masks

    def load(self, i: int) -> tuple[tv_tensors.Image, tv_tensors.Mask | None]:
        mask = None if self.masks is None else tv_tensors.Mask(self.masks[i])
        return tv_tensors.Image(self.images[i]), mask


class FileImageDataset(GroupDataset):
    """Images (and optional masks) read from files listed in a metadata table, by ``reader``'s rules (the
    resized cache, the pixel limit, the mask threshold; docs/datasets.md)."""

    def __init__(
        self,
        paths: Sequence[Path],
        mask_paths: Sequence[Path | None] | None,
        mask_marks_core: bool = False,
        reader: FileReader | None = None,
        **labels: Any,
    ) -> None:
        super().__init__(has_masks=mask_paths is not None, **labels)
        self.paths = list(paths)
        self.mask_paths = None if mask_paths is None else list(mask_paths)
        self.mask_marks_core = mask_marks_core
        self.reader = reader or FileReader()

    def load(self, i: int) -> tuple[tv_tensors.Image, tv_tensors.Mask | None]:
        loaded = self.reader.image(self.paths[i])
        image = tv_tensors.Image(loaded.image)
        if self.mask_paths is None:
            return image, None
        mask_path = self.mask_paths[i]
        if mask_path is None:  # no spurious region in this image
            return image, tv_tensors.Mask(torch.zeros((1, *image.shape[-2:]), dtype=torch.bool))
        mask = self.reader.mask(mask_path, self.paths[i], loaded)
        return image, tv_tensors.Mask(~mask if self.mask_marks_core else mask)
