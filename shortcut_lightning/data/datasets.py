"""Map-style datasets that return the sample dict of the data contract.

``{"image", "target", "group", "spurious", "index"}`` plus ``"mask"`` (bool [1,H,W], the spurious
region) when the dataset has masks. ``group = target * n_spurious + spurious``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from shortcut_lightning.errors import DataError


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


def read_image(path: Path) -> tv_tensors.Image:
    """RGB uint8 image; a missing or unreadable file is named in the error."""
    try:
        with Image.open(path) as im:
            array = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
            w, h = im.size
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            f"cannot read image {path}: {exc}. Fix or remove the file, or run with "
            "check_images: full to find and skip every unreadable image before training."
        ) from exc
    return tv_tensors.Image(array.view(h, w, 3).permute(2, 0, 1))


def read_mask(path: Path, invert: bool) -> tv_tensors.Mask:
    """Binary mask (pixels > 127 are set); ``invert`` when the file marks the core object instead."""
    try:
        with Image.open(path) as im:
            gray = im.convert("L")
            w, h = gray.size
            values = torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).view(1, h, w)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            f"cannot read mask {path}: {exc}. Fix the file or drop the mask_filename column."
        ) from exc
    mask = values > 127
    return tv_tensors.Mask(~mask if invert else mask)


class FileImageDataset(GroupDataset):
    """Images (and optional masks) read from files listed in a metadata table."""

    def __init__(
        self,
        paths: Sequence[Path],
        mask_paths: Sequence[Path | None] | None,
        mask_marks_core: bool = False,
        **labels: Any,
    ) -> None:
        super().__init__(has_masks=mask_paths is not None, **labels)
        self.paths = list(paths)
        self.mask_paths = None if mask_paths is None else list(mask_paths)
        self.mask_marks_core = mask_marks_core

    def load(self, i: int) -> tuple[tv_tensors.Image, tv_tensors.Mask | None]:
        image = read_image(self.paths[i])
        if self.mask_paths is None:
            return image, None
        mask_path = self.mask_paths[i]
        if mask_path is None:  # no spurious region in this image
            return image, tv_tensors.Mask(torch.zeros((1, *image.shape[-2:]), dtype=torch.bool))
        mask = read_mask(mask_path, invert=self.mask_marks_core)
        if mask.shape[-2:] != image.shape[-2:]:
            raise DataError(
                f"mask {self.mask_paths[i]} is {tuple(mask.shape[-2:])} but its image {self.paths[i]} is "
                f"{tuple(image.shape[-2:])}: masks must have the size of their image"
            )
        return image, mask
