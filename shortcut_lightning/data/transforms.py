"""Image transforms that move the spurious-region mask with its image (torchvision.transforms.v2)."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_float() -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def eval_transform(image_size: int) -> v2.Transform:
    """Resize the short side to ``image_size * 256/224``, centre-crop (the DFR reference protocol)."""
    resize = round(image_size * 256 / 224)
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(image_size), *_to_float()])


def train_transform(image_size: int) -> v2.Transform:
    """Random resized crop (scale 0.7-1) and horizontal flip, as in the Waterbirds/DFR training code."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(0.7, 1.0), ratio=(0.75, 4 / 3), antialias=True),
            v2.RandomHorizontalFlip(),
            *_to_float(),
        ]
    )


def tensor_transform(image_size: int, augment: bool) -> v2.Transform:
    """For images already rendered at ``image_size``: normalise; optionally shift by up to 1/8 of the side.

    No flips: the embedded benchmark's core feature is an orientation, which a flip would change.
    """
    steps: list[v2.Transform] = []
    if augment:
        steps.append(v2.RandomCrop(image_size, padding=max(1, image_size // 8), padding_mode="reflect"))
    return v2.Compose([*steps, *_to_float()])


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Images [..., 3, H, W] normalised by our transforms back to [0, 1], for figures."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images * std + mean).clamp(0, 1)
