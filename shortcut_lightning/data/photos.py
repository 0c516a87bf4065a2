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
seed and the sources alone.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from shortcut_lightning.errors import DataError

STAMPS, PLASMA, MATE = "tuxpaint-stamps-default", "plasma-workspace-wallpapers", "mate-backgrounds"
PACKAGES = (STAMPS, PLASMA, MATE)
_ANIMALS = f"{STAMPS}/usr/share/tuxpaint/stamps/animals"
_WALL, _NATURE = f"{PLASMA}/usr/share/wallpapers", f"{MATE}/usr/share/backgrounds/mate/nature"


def _paths(pattern: str, names: str) -> tuple[str, ...]:
    """``pattern`` filled with each of the space-separated ``names``, in order."""
    return tuple(pattern.format(name) for name in names.split())


# class -> cut-outs (paths inside the extracted packages)
ANIMALS: dict[str, tuple[str, ...]] = {
    "hoofed": _paths(
        f"{_ANIMALS}/mammals/bovines/{{}}.png",
        "bison bull cow cow_white gnu-baby gnu-baby-stand gnu-sitting gnu-stand goat indian_blackbuck "
        "mountaingoat ram sheep sheep_lamb yak zebu",
    )
    + _paths(
        f"{_ANIMALS}/mammals/{{}}.png",
        "camel/camel camel/dromedary deer/caribou deer/deer deer/doe deer/wapiti equines/donkey "
        "equines/donkey_eating equines/horse equines/zebra giraffe pig pig_golden pig_golden2 rhino_black "
        "wildboar hippopotamus",
    ),
    "clawed": _paths(
        f"{_ANIMALS}/mammals/{{}}.png",
        "badger ferret rabbit_little bears/bear bears/european-bear cats/lion cats/lion-2 cats/tiger "
        "cats/tiger_sumatran dogs/dingo dogs/dog dogs/fox",
    )
    + _paths(
        f"{_ANIMALS}/mammals/rodents/{{}}.png", "beaver capybara marmot mouse rabbit rabbit-2 rat squirrel"
    )
    + _paths(f"{_ANIMALS}/mammals/apes/{{}}.png", "chimp gorilla tamarin_emperor")
    + _paths(f"{_ANIMALS}/marsupials/{{}}.png", "kangaroo koala wombat"),
}
# place -> background photos: a plasma wallpaper folder (its largest landscape image) or a file
BACKGROUNDS: dict[str, tuple[str, ...]] = {
    "land": _paths(f"{_WALL}/{{}}", "Path OneStandsOut FallenLeaf")
    + _paths(f"{_NATURE}/{{}}.jpg", "GreenMeadow LadyBird RainDrops"),
    "water": _paths(f"{_WALL}/{{}}", "BytheWater ColdRipple DarkestHour summer_1am EveningGlow")
    + _paths(f"{_NATURE}/{{}}.jpg", "Aqua"),
}
CLASSES, PLACES = tuple(ANIMALS), tuple(BACKGROUNDS)
SPLITS = ("train", "val", "test")
STRIPS = 5  # per background photo: 3 train, 1 val, 1 test
DEFAULT_CACHE = Path("~/.cache/shortcut_lightning/photo_sources")  # or $SHORTCUT_CACHE/photo_sources


def default_cache() -> Path:
    """Where fetched packages live: ``$SHORTCUT_CACHE/photo_sources`` when that is set, else ``DEFAULT_CACHE``."""
    root = os.environ.get("SHORTCUT_CACHE", "").strip()
    return (Path(root) / "photo_sources" if root else DEFAULT_CACHE).expanduser()


def fetch_sources(cache: Path | None = None) -> Path:
    """The extracted Debian packages under ``cache`` (``<cache>/<package>/usr/...``), fetched when missing.

    Uses ``apt-get download`` and ``dpkg-deb -x``: no root, no install. Fails in one line that says what
    to run when a package cannot be fetched.
    """
    cache = (cache or default_cache()).expanduser()
    for package in PACKAGES:
        target = cache / package
        if (target / "usr").is_dir():
            continue
        tools = [t for t in ("apt-get", "dpkg-deb") if shutil.which(t) is None]
        if tools:
            raise DataError(
                f"cannot fetch {package}: {' and '.join(tools)} not found. On Debian/Ubuntu run "
                f"`apt-get download {package} && dpkg-deb -x {package}_*.deb {target}`, or pass --sources DIR "
                f"holding the extracted packages {', '.join(PACKAGES)}"
            )
        with tempfile.TemporaryDirectory() as tmp:
            got = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
            debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
            if got.returncode != 0 or not debs:
                reason = (got.stderr.strip().splitlines() or ["no .deb"])[-1]
                raise DataError(
                    f"cannot fetch {package} ({reason}): run `apt-get update` and retry, or "
                    f"`apt-get download {package}` elsewhere and pass --sources DIR with it extracted"
                )
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            unpacked = subprocess.run(
                ["dpkg-deb", "-x", str(debs[0]), str(partial)], capture_output=True, text=True
            )
            if unpacked.returncode != 0:
                raise DataError(f"cannot extract {debs[0].name}: {unpacked.stderr.strip()[-300:]}")
            version = subprocess.run(
                ["dpkg-deb", "-f", str(debs[0]), "Version"], capture_output=True, text=True
            )
            (partial / "VERSION").write_text(version.stdout.strip() + "\n")
            partial.rename(target)
    return cache


def _source(sources: Path, rel: str) -> Path:
    path = sources / rel
    if path.is_dir():  # a plasma wallpaper: its largest landscape image
        images = [p for p in (path / "contents" / "images").glob("*x*.*") if p.suffix in (".jpg", ".png")]
        wide = [p for p in images if _size(p)[0] > _size(p)[1]]
        if wide:
            return max(wide, key=lambda p: _size(p)[0])
        path = path / "contents" / "images"
    if not path.is_file():
        raise DataError(
            f"photo source {path} is missing: rerun `shortcut-data photos` without --sources, or "
            f"extract the Debian package {rel.split('/')[0]} there"
        )
    return path


def _place_name(path: Path) -> str:
    """A background photo's ``place_filename``: a plasma wallpaper's folder name, else the file name."""
    return path.parents[2].name if path.parent.name == "images" else path.name


def _size(path: Path) -> tuple[int, int]:
    width, _, height = path.stem.partition("x")
    return (int(width), int(height)) if width.isdigit() and height.isdigit() else (0, 0)


def _open(path: Path, mode: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except Exception as exc:  # PIL raises many types for broken files
        raise DataError(
            f"photo source {path} is unreadable ({type(exc).__name__}: {exc}): re-fetch it"
        ) from exc


def _cutout(path: Path) -> Image.Image:
    """The animal cropped to its alpha's bounding box; a file without transparency is refused."""
    image = _open(path, "RGBA")
    alpha = image.getchannel("A")
    box = alpha.point(lambda v: 255 if v > 127 else 0).getbbox()
    if box is None or alpha.getextrema()[0] > 127:
        raise DataError(f"photo source {path} has no transparent background: a cut-out needs an alpha mask")
    return image.crop(box)


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
    minority: float = 0.05,
    class0_share: float = 0.77,
) -> Path:
    """Writes the benchmark to ``out`` (``metadata.csv``, ``<class>/<id>.jpg``, ``masks/<id>.png``, ``build.json``).

    ``animals``: ``shared`` (every split draws from all cut-outs, as Waterbirds' splits share species) or
    ``disjoint`` (each cut-out in one split, about 60/20/20 per class: unseen individuals at test time).
    ``scale``: range of the animal's longer side as a share of the image side.
    """
    if animals not in ("shared", "disjoint"):
        raise DataError(f"animals {animals!r} is unknown: choose shared or disjoint")
    if not 0 <= minority < 0.5 or image_size < 16 or min(n_train, n_val, n_test) < 4:
        raise DataError("need 0 <= minority < 0.5, image_size >= 16 and at least 4 images per split")
    src = Path(sources).expanduser() if sources is not None else fetch_sources()
    out = Path(out).expanduser()
    rng = np.random.default_rng(seed)
    cutouts = {c: [(Path(rel).stem, _cutout(_source(src, rel))) for rel in ANIMALS[c]] for c in CLASSES}
    pools = {}
    for y, c in enumerate(CLASSES):
        order = rng.permutation(len(cutouts[c]))
        bounds = (round(0.6 * len(order)), round(0.8 * len(order)))
        parts = (order[: bounds[0]], order[bounds[0] : bounds[1]], order[bounds[1] :])
        for s, split in enumerate(SPLITS):
            pools[(y, split)] = [cutouts[c][i] for i in (parts[s] if animals == "disjoint" else order)]
    backgrounds = {a: [(_source(src, rel), None) for rel in BACKGROUNDS[p]] for a, p in enumerate(PLACES)}
    strips = {}  # per photo: the strips of each split
    for a in backgrounds:
        for i, (path, _) in enumerate(backgrounds[a]):
            order = rng.permutation(STRIPS)
            strips[(a, i)] = {
                "train": order[:3].tolist(),
                "val": order[3:4].tolist(),
                "test": order[4:].tolist(),
            }
            backgrounds[a][i] = (path, _open(path, "RGB"))
    for c in CLASSES:
        (out / c).mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rows, index = [], 0
    plan = [
        (split, yc, k)
        for split, n in zip(SPLITS, (n_train, n_val, n_test), strict=True)
        for yc, k in group_counts(split, n, minority, class0_share).items()
    ]
    with tqdm(total=sum(k for *_, k in plan), desc=f"building {out}", mininterval=2) as bar:
        for split, (y, a), k in plan:
            for _ in range(k):
                rows.append(
                    _compose(
                        out,
                        index,
                        seed,
                        split,
                        y,
                        a,
                        pools[(y, split)],
                        backgrounds[a],
                        strips,
                        image_size,
                        scale,
                    )
                )
                index += 1
                bar.update()
    fields = [
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
    ]
    with (out / "metadata.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        writer.writerows([[row[f] for f in fields] for row in rows])
    photos = [
        {
            "place_filename": _place_name(path),
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
    split: str,
    y: int,
    a: int,
    pool: list,
    backgrounds: list,
    strips: dict,
    size: int,
    scale: Sequence[float],
) -> dict:
    """One image: a crop of a background strip of this split, one cut-out pasted on it, and its mask."""
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
    canvas.save(out / image_name, quality=95)
    mask.save(out / mask_name)
    return {
        "img_id": index,
        "img_filename": image_name,
        "y": y,
        "split": SPLITS.index(split),
        "place": a,
        "place_filename": _place_name(path),
        "place_strip": strip,
        "place_box": " ".join(map(str, box)),
        "place_flip": int(flip),
        "animal": name,
        "mask_filename": mask_name,
    }


def _write_record(out: Path, sources: Path, rows: list[dict], **settings: object) -> None:
    """``build.json``: settings, counts per split and group, package versions, the files and strips used."""
    counts = {
        split: {
            f"{CLASSES[y]}_{PLACES[a]}": sum(
                1 for r in rows if r["split"] == s and r["y"] == y and r["place"] == a
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
    record = {
        **settings,
        "counts": counts,
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
    photos.add_argument("--out", default="data/photos")
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
            args.out,
            args.sources,
            args.seed,
            args.image_size,
            args.n_train,
            args.n_val,
            args.n_test,
            args.animals,
        )
    except DataError as error:
        parser.exit(2, f"shortcut-data: error: {error}\n")
    counts = json.loads((out / "build.json").read_text())["counts"]
    for split, groups in counts.items():
        print(f"{split:<6}" + "  ".join(f"{g} {n}" for g, n in groups.items()))
    print(f"wrote {out} (load it with shortcut_lightning.data.Waterbirds, data.root: {out})")


if __name__ == "__main__":
    main()
