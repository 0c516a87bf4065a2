"""The variants of the real-photo benchmark (``shortcut-data photos --variant``): which images each split holds,
and the colour patch of ``patch``.

- ``waterbirds`` (default): Waterbirds' protocol. In train 95% of each class sits on its own place (hoofed on
  land, clawed on water), classes 77/23; val and test balanced over class x place.
- ``correlation100``: the same with no minority image in train (Waterbirds-100%: no hoofed animal on water, no
  clawed one on land); val and test are the ``waterbirds`` build's, image for image (same seed and sizes).
- ``patch`` (ISIC-like, the colour-patch shortcut): a cyan disc is pasted on half of the hoofed training images
  and on no clawed training image; val and test are balanced over class x patch. The spurious attribute
  (``place`` column) is the patch flag; the background place is drawn independently of the class in every split
  (half of each class x patch group on land, half on water), so the background is no shortcut here. The masks
  mark the patch (``mask_marks: spurious``), and an image without a patch has none (an empty cell).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from shortcut_lightning.errors import DataError

VARIANTS = ("waterbirds", "correlation100", "patch")
DEFAULT_OUT = {
    "waterbirds": "data/photos",
    "correlation100": "data/photos_c100",
    "patch": "data/photos_patch",
}
MINORITY = {"waterbirds": 0.05, "correlation100": 0.0}  # share of each training class on the other place
PATCH_NAMES = ("no_patch", "patch")  # the patch variant's spurious values (ISIC's names)
PATCH_COLUMNS = ("background", "patch_box", "patch_on_animal")  # its extra metadata.csv columns
PATCH = {
    "class": "hoofed",  # class 0, the majority, as ISIC's patches sit on benign (majority) images only
    "colour": (0, 255, 255),  # cyan: no pixel of the sources lies within 100 (RGB distance) of it
    "shape": "disc",
    "diameter": (1 / 6, 1 / 5),  # of the image side, uniform per image
    "max_cover": 0.1,  # largest share of the animal's pixels the disc may hide
    "tries": 20,  # positions drawn until one hides at most max_cover (else the one that hides least)
}


@dataclass(frozen=True)
class ImageSpec:
    """One image of the plan: its split, class, background place and (``patch`` variant only) patch flag."""

    split: str
    y: int
    place: int
    patch: bool | None = None


def group_counts(split: str, n: int, minority: float, class0_share: float) -> dict[tuple[int, int], int]:
    """Images per (class, place): Waterbirds' train correlation and imbalance, or balanced val/test."""
    if split != "train":
        return {(y, a): n // 4 + (1 if 2 * y + a < n % 4 else 0) for y in (0, 1) for a in (0, 1)}
    per_class = (round(class0_share * n), n - round(class0_share * n))
    counts = {}
    for y, total in enumerate(per_class):
        off = round(minority * total)
        counts[(y, y)], counts[(y, 1 - y)] = total - off, off  # class y's own place is y
    return counts


def patch_counts(split: str, n: int, class0_share: float, patch_share: float) -> dict[tuple[int, int], int]:
    """Images per (class, patch flag): ``patch_share`` of the hoofed training images carry the patch, no clawed
    one does; val/test balanced over the four groups."""
    if split != "train":
        return group_counts(split, n, 0.0, class0_share)
    hoofed = round(class0_share * n)
    patched = round(patch_share * hoofed)
    return {(0, 0): hoofed - patched, (0, 1): patched, (1, 0): n - hoofed, (1, 1): 0}


def resolve_minority(variant: str, minority: float | None, patch_share: float) -> float | None:
    """The training minority share the variant builds with (None for ``patch``: no place correlation)."""
    if variant not in VARIANTS:
        raise DataError(f"variant {variant!r} is unknown: choose one of {', '.join(VARIANTS)}")
    if variant == "patch":
        if minority is not None:
            raise DataError(
                "the patch variant draws the background independently of the class: drop minority"
            )
        if not 0 < patch_share <= 1:
            raise DataError(f"need 0 < patch_share <= 1, got {patch_share}")
        return None
    if variant == "correlation100" and minority not in (None, 0):
        raise DataError(f"correlation100 has no minority images by definition: drop minority ({minority})")
    return MINORITY[variant] if minority is None else minority


def plan(
    variant: str,
    sizes: dict[str, int],
    rng: np.random.Generator,
    minority: float | None,
    class0_share: float,
    patch_share: float,
) -> list[ImageSpec]:
    """Every image of the build, in index order: split by split, group by group. Only ``patch`` draws from
    ``rng`` (each group's backgrounds, half land and half water in a seeded order), so the other variants'
    images are those of the builds before variants existed."""
    if variant != "patch":
        return [
            ImageSpec(split, y, a)
            for split, n in sizes.items()
            for (y, a), k in group_counts(split, n, minority or 0.0, class0_share).items()
            for _ in range(k)
        ]
    specs = []
    for split, n in sizes.items():
        for (y, flag), k in patch_counts(split, n, class0_share, patch_share).items():
            places = rng.permutation((np.arange(k) + int(rng.integers(2))) % 2)
            specs += [ImageSpec(split, y, int(a), bool(flag)) for a in places]
    return specs


def spurious_names(variant: str, places: tuple[str, ...]) -> tuple[str, ...]:
    """The names of the ``place`` column's values: the places, or ``no_patch, patch``."""
    return PATCH_NAMES if variant == "patch" else places


def patch_row(
    canvas: Image.Image, animal: Image.Image, spec: ImageSpec, r: np.random.Generator
) -> tuple[Image.Image | None, dict]:
    """Pastes the patch on ``canvas`` when ``spec`` has one: its mask (None without a patch) and the row's
    patch-variant fields (``place`` becomes the patch flag, ``background`` keeps the place)."""
    row = {"place": int(bool(spec.patch)), "background": spec.place, "patch_box": "", "patch_on_animal": ""}
    if not spec.patch:
        return None, {**row, "mask_filename": ""}
    size = canvas.width
    on_animal = np.asarray(animal) > 127
    best = None
    for _ in range(PATCH["tries"]):
        side = round(size * r.uniform(*PATCH["diameter"]))
        x, y = int(r.integers(0, size - side + 1)), int(r.integers(0, size - side + 1))
        disc = Image.new("L", (size, size), 0)
        ImageDraw.Draw(disc).ellipse((x, y, x + side - 1, y + side - 1), fill=255)
        cover = float((np.asarray(disc) > 0)[on_animal].sum() / max(1, on_animal.sum()))
        if best is None or cover < best[0]:
            best = (cover, (x, y, x + side, y + side), disc)
        if cover <= PATCH["max_cover"]:
            break
    cover, box, disc = best
    canvas.paste(Image.new("RGB", canvas.size, PATCH["colour"]), (0, 0), disc)
    return disc, {**row, "patch_box": " ".join(map(str, box)), "patch_on_animal": round(cover, 4)}


def record(variant: str, patch_share: float) -> dict:
    """The variant's entry of ``build.json``."""
    if variant != "patch":
        return {"variant": variant}
    return {"variant": variant, "patch": {**PATCH, "share": patch_share, "spurious_names": list(PATCH_NAMES)}}
