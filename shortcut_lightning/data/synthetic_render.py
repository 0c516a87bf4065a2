"""Procedural images for the embedded benchmark: a class-shaped object (core) on spurious context.

The core feature is the orientation of an elongated object of random colour, size and position: class 0
objects lie along one diagonal family of angles, class 1 along the other, with overlap controlled by
``core_noise``. The spurious features are a background family (``land``-like blotches vs ``water``-like
waves) and a colour-calibration-like striped patch in a corner. Everything is drawn from one seeded
generator, so a split is a pure function of its arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPURIOUS_KINDS = ("background", "patch", "both")


@dataclass(frozen=True)
class RenderedSplit:
    """Arrays of one split: images uint8 [N,3,H,W], masks bool [N,1,H,W], labels int64 [N]."""

    images: np.ndarray
    masks: np.ndarray
    targets: np.ndarray
    spurious: np.ndarray


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: bilinear upsampling of a coarse random grid."""
    grid = rng.random((cells + 1, cells + 1))
    pos = np.linspace(0, cells, size, endpoint=False)
    i = pos.astype(int)
    f = pos - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _background(rng: np.random.Generator, size: int, yy: np.ndarray, water: int | None) -> np.ndarray:
    """A [H,W,3] float background: land (blotches), water (waves) or neutral skin-like texture."""
    if water is None:
        base = np.array([0.78, 0.62, 0.52]) + rng.normal(0, 0.04, 3)
        tex = _smooth_noise(rng, size, 4)[..., None] * 0.15 - 0.075
        return base + tex
    if water:
        base = np.array([0.18, 0.38, 0.72]) + rng.normal(0, 0.05, 3)
        freq, phase = rng.uniform(3, 6), rng.uniform(0, 2 * np.pi)
        waves = np.sin(2 * np.pi * freq * yy + phase)[..., None] * np.array([0.08, 0.1, 0.12])
        return base + waves
    base = np.array([0.42, 0.55, 0.22]) + rng.normal(0, 0.05, 3)
    blotch = _smooth_noise(rng, size, 3)[..., None] * np.array([0.25, 0.15, 0.05]) - 0.1
    return base + blotch


def _object_mask(
    rng: np.random.Generator, target: int, yy: np.ndarray, xx: np.ndarray, core_noise: float
) -> np.ndarray:
    """Boolean [H,W] ellipse whose orientation family encodes the class."""
    centre = rng.uniform(0.35, 0.65, 2)
    length = rng.uniform(0.3, 0.42)
    width = length / rng.uniform(3.0, 4.5)
    angle = (np.pi / 4 if target == 0 else -np.pi / 4) + rng.normal(0, core_noise)
    dy, dx = yy - centre[0], xx - centre[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    return (u / length) ** 2 + (v / width) ** 2 <= 1.0


def _patch_mask(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A striped colour patch in a random corner: its boolean mask and its [H,W,3] colours."""
    side = round(size * rng.uniform(0.22, 0.3))
    corner = rng.integers(0, 4)
    top = 1 if corner < 2 else size - side - 1
    left = 1 if corner % 2 == 0 else size - side - 1
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    stripes = np.array([[0.95, 0.2, 0.6], [0.2, 0.85, 0.9], [0.98, 0.8, 0.1]])
    cols = (np.arange(size) - left) * 3 // max(side, 1)
    colours = stripes[np.clip(cols, 0, 2)][None, :, :].repeat(size, axis=0)
    return mask, colours


def render_split(
    n: int,
    kind: str,
    image_size: int,
    attribute_rates: dict[str, tuple[float, float]],
    class_share: float,
    core_noise: float,
    pixel_noise: float,
    seed: int,
) -> RenderedSplit:
    """Draw ``n`` samples.

    ``attribute_rates[name] = (P(attr=1 | y=0), P(attr=1 | y=1))`` for ``name`` in ``background``
    (1 = water) and ``patch`` (1 = patch present). ``spurious`` is ``water * 2 + patch`` for
    ``kind="both"``, else the single attribute. The mask marks the spurious region: the background
    (everything outside the object) and/or the patch.
    """
    if kind not in SPURIOUS_KINDS:
        raise ValueError(f"spurious kind {kind!r} is not one of {SPURIOUS_KINDS}")
    rng = np.random.default_rng(seed)
    size = image_size
    yy, xx = np.meshgrid((np.arange(size) + 0.5) / size, (np.arange(size) + 0.5) / size, indexing="ij")
    images = np.empty((n, 3, size, size), dtype=np.uint8)
    masks = np.empty((n, 1, size, size), dtype=bool)
    targets = (rng.random(n) < class_share).astype(np.int64)
    attrs = {
        name: (rng.random(n) < np.where(targets == 1, rates[1], rates[0])).astype(np.int64)
        for name, rates in attribute_rates.items()
    }
    use_bg = kind in ("background", "both")
    use_patch = kind in ("patch", "both")
    for j in range(n):
        water = int(attrs["background"][j]) if use_bg else None
        img = _background(rng, size, yy, water)
        obj = _object_mask(rng, int(targets[j]), yy, xx, core_noise)
        colour = rng.uniform(0.1, 0.95, 3)
        img[obj] = colour + rng.normal(0, 0.03, 3)
        spur = ~obj if use_bg else np.zeros_like(obj)
        if use_patch and attrs["patch"][j]:
            pmask, pcol = _patch_mask(rng, size)
            img[pmask] = pcol[pmask]
            spur = spur | pmask
        img = img + rng.normal(0, pixel_noise, img.shape)
        images[j] = (np.clip(img, 0, 1) * 255).round().astype(np.uint8).transpose(2, 0, 1)
        masks[j, 0] = spur
    if kind == "both":
        spurious = attrs["background"] * 2 + attrs["patch"]
    else:
        spurious = attrs["background" if use_bg else "patch"]
    return RenderedSplit(images, masks, targets, spurious)
