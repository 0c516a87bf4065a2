"""Where the real-photo benchmark's pixels come from: the Debian packages, the files used in them, the fetch.

``ANIMALS`` lists the cut-outs per class, ``BACKGROUNDS`` the landscape photos per place (paths inside the
extracted packages); :func:`fetch_sources` fetches and extracts the packages with ``apt-get download`` and
``dpkg-deb -x`` (no root), and the readers below refuse a missing, unreadable or opaque file in one line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

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


def source(sources: Path, rel: str) -> Path:
    """The file of ``rel`` under ``sources`` (a plasma wallpaper folder: its largest landscape image), or a
    one-line error naming the package to extract."""
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


def place_name(path: Path) -> str:
    """A background photo's ``place_filename``: a plasma wallpaper's folder name, else the file name."""
    return path.parents[2].name if path.parent.name == "images" else path.name


def _size(path: Path) -> tuple[int, int]:
    width, _, height = path.stem.partition("x")
    return (int(width), int(height)) if width.isdigit() and height.isdigit() else (0, 0)


def open_image(path: Path, mode: str) -> Image.Image:
    """The image at ``path`` in ``mode``, loaded; an unreadable file is refused in one line."""
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except Exception as exc:  # PIL raises many types for broken files
        raise DataError(
            f"photo source {path} is unreadable ({type(exc).__name__}: {exc}): re-fetch it"
        ) from exc


def cutout(path: Path) -> Image.Image:
    """The animal cropped to its alpha's bounding box; a file without transparency is refused."""
    image = open_image(path, "RGBA")
    alpha = image.getchannel("A")
    box = alpha.point(lambda v: 255 if v > 127 else 0).getbbox()
    if box is None or alpha.getextrema()[0] > 127:
        raise DataError(f"photo source {path} has no transparent background: a cut-out needs an alpha mask")
    return image.crop(box)
