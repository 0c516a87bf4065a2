"""How a dataset reads an image file and its mask: through the resized cache when one is set and the image is
large, from the original otherwise. A read that misses the cache builds the entry on the spot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from shortcut_lightning.data.image_files import (
    as_tensor,
    open_image,
    orient,
    orientation,
    read_mask_array,
    to_rgb,
)
from shortcut_lightning.data.resize_cache import ResizeCache, resized_image, resized_mask
from shortcut_lightning.errors import DataError

SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that turn the image by a quarter


class Loaded(NamedTuple):
    """An image as uint8 [3, H, W]; ``cached``: it is a resized copy; ``source``: the original's (H, W) if known."""

    image: torch.Tensor
    cached: bool
    source: tuple[int, int] | None


def oriented_size(path: Path, max_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) of the image as the camera held it, from the file's header."""
    with open_image(path, "image", max_pixels) as im:
        w, h = im.size
        return (w, h) if orientation(im) in SWAPS_SIDES else (h, w)


@dataclass(frozen=True)
class FileReader:
    """Reads images and masks: ``cache`` (None: none), ``max_image_pixels`` (None: Pillow's limit) and the mask
    rule's ``mask_threshold``. Plain data, so every loader worker (fork or spawn) reads by the same rules."""

    cache: ResizeCache | None = None
    max_image_pixels: int | None = None
    mask_threshold: float = 0.0

    def image(self, path: Path) -> Loaded:
        """The image of ``path``: its cached copy, a copy built now, or the original when it is not large."""
        cache = self.cache
        entry = None if cache is None else cache.image_entry(path)
        if cache is not None and (array := cache.load_image(entry)) is not None:
            return Loaded(torch.from_numpy(array).permute(2, 0, 1), True, None)
        with open_image(path, "image", self.max_image_pixels) as im:
            if cache is None or not cache.wants(im.size):
                return Loaded(as_tensor(orient(to_rgb(im, path), orientation(im))), False, None)
            w, h = im.size
            source = (w, h) if orientation(im) in SWAPS_SIDES else (h, w)
            array = resized_image(im, path, cache.side)
        cache.store(entry, array)
        return Loaded(torch.from_numpy(np.array(array)).permute(2, 0, 1), True, source)

    def mask(self, path: Path, image_path: Path, loaded: Loaded) -> torch.Tensor:
        """Bool [1, H, W] mask of ``path`` at the size of ``loaded`` (the image of ``image_path``)."""
        size = tuple(loaded.image.shape[-2:])
        if not loaded.cached:
            mask = read_mask_array(path, self.mask_threshold, self.max_image_pixels)
            _same_size(mask.shape, size, path, image_path)
            return torch.from_numpy(mask.copy()).unsqueeze(0)
        mask = self.cached_mask(path, image_path, size, loaded.source)
        return torch.from_numpy(np.array(mask)).unsqueeze(0)

    def cached_mask(
        self, path: Path, image_path: Path, size: tuple[int, int], source: tuple[int, int] | None = None
    ) -> np.ndarray:
        """The mask of a cached image at the copy's (H, W) ``size``: stored, or read, resized and stored now."""
        assert self.cache is not None
        entry = self.cache.mask_entry(path, self.mask_threshold, size)
        stored = self.cache.load_mask(entry, size)
        if stored is not None:
            return stored
        mask = read_mask_array(path, self.mask_threshold, self.max_image_pixels)
        _same_size(mask.shape, source or oriented_size(image_path, self.max_image_pixels), path, image_path)
        small = resized_mask(mask, size)
        self.cache.store(entry, small)
        return small

    def peek_mask(self, path: Path, image_path: Path) -> np.ndarray:
        """Bool [H, W] mask for a look at its content (setup's check): the cached one if its image is cached."""
        if self.cache is not None:
            shape = self.cache.stored_shape(self.cache.image_entry(image_path))
            if shape is not None and len(shape) == 3:
                stored = self.cache.load_mask(
                    self.cache.mask_entry(path, self.mask_threshold, shape[:2]), shape[:2]
                )
                if stored is not None:
                    return stored
        return read_mask_array(path, self.mask_threshold, self.max_image_pixels)


def _same_size(mask: tuple[int, ...], image: tuple[int, ...], path: Path, image_path: Path) -> None:
    if tuple(mask) != tuple(image):
        raise DataError(
            f"mask {path} is {tuple(mask)} but its image {image_path} is {tuple(image)}: masks must have the size "
            "of their image"
        )
