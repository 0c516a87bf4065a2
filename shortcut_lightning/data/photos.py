"""The real-photo shortcut benchmark, built offline as Waterbirds was built (``shortcut-data photos``).

Real photographic animal cut-outs (with alpha) from Debian's ``tuxpaint-stamps-default`` are pasted on
crops of real landscape photographs from ``plasma-workspace-wallpapers`` and ``mate-backgrounds``. The
class is the animal (``hoofed``: ungulates; ``clawed``: carnivores, rodents, primates, marsupials; birds
are kept out on purpose, as an independent check); the spurious attribute is the background (``land``
or ``water``). Waterbirds' protocol: in train 95% of each class sits on "its" background (hoofed on land,
clawed on water) and the classes are imbalanced (77/23); val and test are balanced over the four groups.
Each background photo is cut into 5 vertical strips, 3 for train, 1 for val and 1 for test (a seeded
draw per photo), so no background pixel is shared between splits. The files follow group_DRO's
``metadata.csv`` layout, and the masks mark the animal (as CUB's do), so
:class:`~shortcut_lightning.data.Waterbirds` reads the folder unchanged. The build is a function of the
seed and the sources alone. ``--variant correlation100`` (no minority training image) and ``--variant patch``
(an ISIC-like colour patch on part of one class's training images, masks marking the patch) are described in
:mod:`~shortcut_lightning.data.photo_variants`; the sources and their fetch in
:mod:`~shortcut_lightning.data.photo_sources`.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from shortcut_lightning.data import photo_variants as variants
from shortcut_lightning.data.photo_sources import (
    ANIMALS,
    BACKGROUNDS,
    CLASSES,
    DEFAULT_CACHE,
    PACKAGES,
    PLACES,
    cutout,
    fetch_sources,
    open_image,
    place_name,
    source,
)
from shortcut_lightning.errors import DataError

__all__ = ["ANIMALS", "BACKGROUNDS", "PACKAGES", "STRIPS", "build_photos", "fetch_sources", "main"]

SPLITS = ("train", "val", "test")
STRIPS = 5  # per background photo: 3 train, 1 val, 1 test


FIELDS = (
    "img_id",
    "img_filename",
    "y",
    "split",
    "place",
    "place_filename",
    "place_strip",
    "place_box",
    "place_flip",
    "animal",
    "mask_filename",
)


def build_photos(
    out: str | Path,
    sources: str | Path | None = None,
    seed: int = 0,
    image_size: int = 224,
    n_train: int = 2400,
    n_val: int = 600,
    n_test: int = 1200,
    animals: str = "shared",
    scale: Sequence[float] = (0.45, 0.75),
    minority: float | None = None,
    class0_share: float = 0.77,
    variant: str = "waterbirds",
    patch_share: float = 0.5,
) -> Path:
    """Writes the benchmark to ``out`` (``metadata.csv``, ``<class>/<id>.jpg``, ``masks/<id>.png``, ``build.json``).

    ``animals``: ``shared`` (every split draws from all cut-outs, as Waterbirds' splits share species) or
    ``disjoint`` (each cut-out in one split, about 60/20/20 per class: unseen individuals at test time).
    ``scale``: range of the animal's longer side as a share of the image side.
    ``variant``: ``waterbirds``, ``correlation100`` or ``patch`` (:mod:`~shortcut_lightning.data.photo_variants`).
    ``minority``: share of each training class on the other class's place (None: the variant's, 0.05 for
    ``waterbirds``, 0 for ``correlation100``; ``patch`` takes none). ``patch_share``: share of the hoofed
    training images with the patch (``patch`` only).
    """
    minority = variants.resolve_minority(variant, minority, patch_share)
    if animals not in ("shared", "disjoint"):
        raise DataError(f"animals {animals!r} is unknown: choose shared or disjoint")
    if not 0 <= (minority or 0) < 0.5 or image_size < 16 or min(n_train, n_val, n_test) < 4:
        raise DataError("need 0 <= minority < 0.5, image_size >= 16 and at least 4 images per split")
    src = Path(sources).expanduser() if sources is not None else fetch_sources()
    out = Path(out).expanduser()
    rng = np.random.default_rng(seed)
    cutouts = {c: [(Path(rel).stem, cutout(source(src, rel))) for rel in ANIMALS[c]] for c in CLASSES}
    pools = {}
    for y, c in enumerate(CLASSES):
        order = rng.permutation(len(cutouts[c]))
        bounds = (round(0.6 * len(order)), round(0.8 * len(order)))
        parts = (order[: bounds[0]], order[bounds[0] : bounds[1]], order[bounds[1] :])
        for s, split in enumerate(SPLITS):
            pools[(y, split)] = [cutouts[c][i] for i in (parts[s] if animals == "disjoint" else order)]
    backgrounds = {a: [(source(src, rel), None) for rel in BACKGROUNDS[p]] for a, p in enumerate(PLACES)}
    strips = {}  # per photo: the strips of each split
    for a in backgrounds:
        for i, (path, _) in enumerate(backgrounds[a]):
            order = rng.permutation(STRIPS)
            strips[(a, i)] = {
                "train": order[:3].tolist(),
                "val": order[3:4].tolist(),
                "test": order[4:].tolist(),
            }
            backgrounds[a][i] = (path, open_image(path, "RGB"))
    for c in CLASSES:
        (out / c).mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    sizes = dict(zip(SPLITS, (n_train, n_val, n_test), strict=True))
    plan = variants.plan(variant, sizes, rng, minority, class0_share, patch_share)
    rows = []
    for index, spec in enumerate(tqdm(plan, desc=f"building {out}", mininterval=2)):
        pool, photos = pools[(spec.y, spec.split)], backgrounds[spec.place]
        rows.append(_compose(out, index, seed, spec, pool, photos, strips, image_size, scale))
    fields = [*FIELDS, *(variants.PATCH_COLUMNS if variant == "patch" else ())]
    with (out / "metadata.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        writer.writerows([[row[f] for f in fields] for row in rows])
    photos = [
        {
            "place_filename": place_name(path),
            "place": PLACES[a],
            "file": str(path.relative_to(src)),
            "size": list(image.size),
            "strips": strips[(a, i)],
        }
        for a in backgrounds
        for i, (path, image) in enumerate(backgrounds[a])
    ]
    animals_per_split = {
        CLASSES[y]: {split: sorted({name for name, _ in pools[(y, split)]}) for split in SPLITS}
        for y in range(len(CLASSES))
    }
    _write_record(
        out,
        src,
        rows,
        variants.spurious_names(variant, PLACES),
        **variants.record(variant, patch_share),
        seed=seed,
        image_size=image_size,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        animals=animals,
        scale=list(scale),
        minority=minority,
        class0_share=class0_share,
        background_photos=photos,
        animals_per_split=animals_per_split,
    )
    return out


def _compose(
    out: Path,
    index: int,
    seed: int,
    spec: variants.ImageSpec,
    pool: list,
    backgrounds: list,
    strips: dict,
    size: int,
    scale: Sequence[float],
) -> dict:
    """One image: a crop of a background strip of this split, one cut-out pasted on it (and the patch variant's
    patch), and its mask: the animal, or the patch in the patch variant (none where there is no patch)."""
    split, y, a = spec.split, spec.y, spec.place
    r = np.random.default_rng([seed, index])
    photo = int(r.integers(len(backgrounds)))
    path, background = backgrounds[photo]
    width, height = background.size
    strip_width = width // STRIPS
    strip = strips[(a, photo)][split][int(r.integers(len(strips[(a, photo)][split])))]
    side = int(min(strip_width, height) * r.uniform(0.6, 1.0))
    x0 = strip * strip_width + int(r.integers(0, strip_width - side + 1))
    y0 = int(r.integers(0, height - side + 1))
    box = (x0, y0, x0 + side, y0 + side)  # recorded, so a reader can check it lies inside the strip
    canvas = background.crop(box).resize((size, size), Image.Resampling.BICUBIC)
    flip = r.random() < 0.5
    if flip:
        canvas = canvas.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    name, animal = pool[int(r.integers(len(pool)))]
    if r.random() < 0.5:
        animal = animal.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    factor = r.uniform(*scale) * size / max(animal.size)
    animal = animal.resize(
        (max(1, round(animal.width * factor)), max(1, round(animal.height * factor))),
        Image.Resampling.LANCZOS,
    )
    px, py = int(r.integers(0, size - animal.width + 1)), int(r.integers(0, size - animal.height + 1))
    canvas.paste(animal, (px, py), animal)
    mask = Image.new("L", (size, size), 0)
    mask.paste(animal.getchannel("A").point(lambda v: 255 if v > 127 else 0), (px, py))
    image_name, mask_name = f"{CLASSES[y]}/{index:05d}.jpg", f"masks/{index:05d}.png"
    row = {
        "img_id": index,
        "img_filename": image_name,
        "y": y,
        "split": SPLITS.index(split),
        "place": a,
        "place_filename": place_name(path),
        "place_strip": strip,
        "place_box": " ".join(map(str, box)),
        "place_flip": int(flip),
        "animal": name,
        "mask_filename": mask_name,
    }
    if spec.patch is not None:  # the patch variant: its own draws, so the image above is the same either way
        mask, patch = variants.patch_row(canvas, mask, spec, np.random.default_rng([seed, index, 1]))
        row.update(patch)
    canvas.save(out / image_name, quality=95)
    if mask is not None:
        mask.save(out / mask_name)
    return row


def _write_record(
    out: Path, sources: Path, rows: list[dict], names: Sequence[str], **settings: object
) -> None:
    """``build.json``: settings, counts per split and group (class x ``names``, the ``place`` column's values;
    the patch variant adds class x background), package versions, the files and strips used."""

    def counts(column: str, values: Sequence[str]) -> dict:
        return {
            split: {
                f"{CLASSES[y]}_{values[a]}": sum(
                    1 for r in rows if r["split"] == s and r["y"] == y and r[column] == a
                )
                for y in (0, 1)
                for a in (0, 1)
            }
            for s, split in enumerate(SPLITS)
        }

    versions = {
        p: (sources / p / "VERSION").read_text().strip() if (sources / p / "VERSION").is_file() else None
        for p in PACKAGES
    }
    background = {"background_counts": counts("background", PLACES)} if "background" in rows[0] else {}
    record = {
        **settings,
        "counts": counts("place", names),
        **background,
        "packages": versions,
        "animals_per_class": ANIMALS,
        "backgrounds_per_place": BACKGROUNDS,
    }
    (out / "build.json").write_text(json.dumps(record, indent=2))


def main(argv: Sequence[str] | None = None) -> None:
    """``shortcut-data photos``: build the real-photo benchmark (errors print as one line, exit 2)."""
    parser = argparse.ArgumentParser(prog="shortcut-data", description="Build benchmark data offline.")
    sub = parser.add_subparsers(dest="command", required=True)
    photos = sub.add_parser("photos", help="the real-photo shortcut benchmark (Waterbirds layout)")
    photos.add_argument(
        "--variant",
        default="waterbirds",
        choices=variants.VARIANTS,
        help="waterbirds (95%% correlated place), correlation100 (no minority training image) or patch "
        "(ISIC-like colour patch on part of the hoofed training images; masks mark the patch)",
    )
    photos.add_argument(
        "--out",
        default=None,
        help=f"default: {', '.join(f'{v} {o}' for v, o in variants.DEFAULT_OUT.items())}",
    )
    photos.add_argument(
        "--sources",
        default=None,
        help=f"extracted packages, as DIR/<package>/usr/... (default: fetched into {DEFAULT_CACHE}, "
        "or $SHORTCUT_CACHE/photo_sources when that is set)",
    )
    photos.add_argument("--seed", type=int, default=0)
    photos.add_argument("--image-size", type=int, default=224)
    photos.add_argument("--n-train", type=int, default=2400)
    photos.add_argument("--n-val", type=int, default=600)
    photos.add_argument("--n-test", type=int, default=1200)
    photos.add_argument("--animals", default="shared", choices=("shared", "disjoint"))
    args = parser.parse_args(argv)
    try:
        out = build_photos(
            args.out or variants.DEFAULT_OUT[args.variant],
            args.sources,
            args.seed,
            args.image_size,
            args.n_train,
            args.n_val,
            args.n_test,
            args.animals,
            variant=args.variant,
        )
    except DataError as error:
        parser.exit(2, f"shortcut-data: error: {error}\n")
    counts = json.loads((out / "build.json").read_text())["counts"]
    for split, groups in counts.items():
        print(f"{split:<6}" + "  ".join(f"{g} {n}" for g, n in groups.items()))
    reader = (
        "shortcut_lightning.data.MetadataDataModule with mask_marks: spurious, as configs/photos_patch/erm.yaml"
        if args.variant == "patch"
        else "shortcut_lightning.data.Waterbirds"
    )
    print(f"wrote {out} (load it with {reader}, data.root: {out})")


if __name__ == "__main__":
    main()
