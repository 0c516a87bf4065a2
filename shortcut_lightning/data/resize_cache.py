"""The resized cache: large originals stored once at a little over the model's input size, as uint8 ``.npy``.

An epoch over 24-megapixel JPEGs is bound by decoding them; a copy whose shorter side is
``ceil(1.25 * image_size)`` reads in a fraction of a millisecond and still leaves every transform
downsampling. Entries are keyed on the file (resolved path, modification time in ns, size in bytes), the
side and :data:`FORMAT`, written atomically, and rebuilt when unreadable (docs/datasets.md, resized cache).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from shortcut_lightning.data.image_files import orient, orientation, to_rgb

FORMAT = 1  # bump when what an entry holds changes (resampling, the pixel rules of image_files)
ENV = "SHORTCUT_LIGHTNING_CACHE"
DEFAULT_FOLDER = "~/.cache/shortcut_lightning/resized"
LARGE = 1.5  # an image is cached when its shorter side exceeds this many cache sides
OFF = ("off", "none", "null", "false", "")


def cache_side(image_size: int) -> int:
    """Shorter side of a cached copy: the eval resize (``image_size * 256/224``) and the smallest square random
    crop (scale 0.7 of the area: ``sqrt(0.7) * 1.25 = 1.05`` sides) still downsample from it."""
    return math.ceil(1.25 * image_size)


def cache_folder(setting: str | os.PathLike | None) -> Path | None:
    """The folder ``resize_cache`` names: ``auto`` is ``$SHORTCUT_LIGHTNING_CACHE`` or ``~/.cache/...``; off: None."""
    if setting is None or str(setting).strip().lower() in OFF:
        return None
    if str(setting) == "auto":
        return Path(os.environ.get(ENV) or DEFAULT_FOLDER).expanduser()
    return Path(setting).expanduser()


def target_size(size: tuple[int, int], side: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``side`` and the aspect ratio of ``size``."""
    w, h = size
    return (side, max(side, round(h * side / w))) if w <= h else (max(side, round(w * side / h)), side)


def resized_image(im: Image.Image, path: Path, side: int) -> np.ndarray:
    """uint8 [H, W, 3] of the opened ``im``: decoded at reduced scale where JPEG allows, resized (antialiased) so
    its shorter side is ``side``, EXIF orientation applied."""
    turn = orientation(im)
    target = target_size(im.size, side)
    im.draft(None, target)  # JPEG: decode at 1/2, 1/4 or 1/8 scale, never below the target
    rgb = to_rgb(im, path)
    if rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(orient(rgb, turn))


def resized_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bool mask resized with nearest-neighbour to exactly (height, width) ``size``."""
    if mask.shape == size:
        return mask
    small = Image.fromarray(mask.astype(np.uint8)).resize((size[1], size[0]), Image.Resampling.NEAREST)
    return np.asarray(small) > 0


@dataclass(frozen=True)
class ResizeCache:
    """Entries under ``folder`` for copies with shorter side ``side``."""

    folder: Path
    side: int

    def wants(self, size: tuple[int, int]) -> bool:
        """Whether an image of this (width, height) is cached: its shorter side exceeds 1.5 cache sides."""
        return min(size) > LARGE * self.side

    def _entry(self, path: Path, *extra: object) -> Path | None:
        try:
            stat = os.stat(path)
        except OSError:
            return None  # the reader names the missing file
        key = f"{FORMAT}|{os.path.realpath(path)}|{stat.st_mtime_ns}|{stat.st_size}|{self.side}|{extra}"
        digest = hashlib.sha1(key.encode()).hexdigest()
        return Path(f"{self.folder}/{digest[:2]}/{digest[2:]}.npy")

    def image_entry(self, path: Path) -> Path | None:
        """Where the copy of image ``path`` is (or goes); None when the file cannot be stat'ed."""
        return self._entry(path)

    def mask_entry(self, path: Path, threshold: float, size: tuple[int, int]) -> Path | None:
        """Where the bool mask of ``path`` at (height, width) ``size``, read with ``threshold``, is (or goes)."""
        return self._entry(path, "mask", float(threshold), tuple(size))

    def load_image(self, entry: Path | None) -> np.ndarray | None:
        """The stored uint8 [H, W, 3] copy, or None when absent or not a complete entry (it is rebuilt)."""
        array = _load(entry)
        ok = array is not None and array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
        return array if ok and min(array.shape[:2]) == self.side else None

    def load_mask(self, entry: Path | None, size: tuple[int, int]) -> np.ndarray | None:
        """The stored bool mask of (height, width) ``size``, or None."""
        array = _load(entry)
        return array if array is not None and array.dtype == np.bool_ and array.shape == tuple(size) else None

    def stored_shape(self, entry: Path | None) -> tuple[int, ...] | None:
        """The shape of a stored entry, read from its header only; None when there is none."""
        try:
            return tuple(np.load(entry, mmap_mode="r", allow_pickle=False).shape) if entry else None
        except (OSError, ValueError, EOFError):
            return None

    def store(self, entry: Path | None, array: np.ndarray) -> None:
        """Writes ``entry`` atomically (a temporary file, then ``os.replace``): concurrent loader workers and DDP
        ranks may write the same entry. A failed write (full or read-only disk) warns once; reading goes on."""
        if entry is None:
            return
        tmp = entry.with_name(f"{entry.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(array), allow_pickle=False)
            os.replace(tmp, entry)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            _warn_once(
                str(self.folder),
                f"cannot write the resized cache in {self.folder} ({exc}): images are read from the originals",
            )


def _load(entry: Path | None) -> np.ndarray | None:
    if entry is None:
        return None
    try:
        return np.load(entry, allow_pickle=False)
    except (OSError, ValueError, EOFError):  # absent, truncated or not an .npy file
        return None


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)
