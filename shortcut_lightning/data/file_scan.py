"""The setup pass over a table's files: the image check (``check_images``) and the resized cache's build, in one
pass that decodes each file at most once, in ``num_workers`` processes, each DDP rank on its share."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from shortcut_lightning.data.file_reader import SWAPS_SIDES, FileReader
from shortcut_lightning.data.image_files import open_image, orientation
from shortcut_lightning.data.resize_cache import resized_image
from shortcut_lightning.data.samplers import world
from shortcut_lightning.errors import DataError

SAMPLE = 64  # headers read to decide whether a table without a header check holds large images
MIN_FOR_WORKERS = 32  # fewer files than this are read in this process: starting workers costs more


class ScanItem(NamedTuple):
    """One file: its image check (``none``, ``exists``, ``header``, ``full``), whether to cache it, its mask."""

    path: Path
    check: str
    cache: bool
    mask: Path | None = None


def problem_of(error: DataError) -> str:
    """The short reason a file is listed as bad."""
    pixels = getattr(error, "pixels", None)
    if pixels is not None:
        return f"too large: {pixels:,} pixels, see data.max_image_pixels"
    cause = error.__cause__
    return str(error) if cause is None else f"unreadable ({type(cause).__name__})"


def quick(item: ScanItem, reader: FileReader) -> tuple[bool, str | None]:
    """(done, problem) without opening the file: absent, not asked for, or its copy already cached."""
    if item.check == "none" and not item.cache:
        return True, None
    if not item.path.is_file():
        return True, "missing"
    if not item.cache:
        return item.check == "exists", None
    assert reader.cache is not None
    # a stored copy keyed on this very file (path, mtime, size) decoded when it was built: no need to check it again
    entry = reader.cache.image_entry(item.path)
    return entry is not None and entry.is_file(), None


def scan_file(item: ScanItem, reader: FileReader) -> tuple[str | None, bool]:
    """Checks one file and caches its copy (and its mask's) when it is large: (the problem or None, cached)."""
    cache = reader.cache if item.cache else None
    try:
        with open_image(item.path, "image", reader.max_image_pixels) as im:
            if cache is not None and cache.wants(im.size):
                w, h = im.size
                source = (w, h) if orientation(im) in SWAPS_SIDES else (h, w)
                array = resized_image(im, item.path, cache.side)  # the full decode: the check too
            else:
                array = None
                if item.check == "full":
                    im.load()
                elif item.check == "header":
                    im.verify()
    except DataError as exc:
        return problem_of(exc), False
    except Exception as exc:  # PIL raises many types for broken files
        return f"unreadable ({type(exc).__name__})", False
    if array is not None:
        cache.store(cache.image_entry(item.path), array)
        if item.mask is not None:
            with contextlib.suppress(DataError):  # a bad mask is named when its sample is loaded
                reader.cached_mask(item.mask, item.path, array.shape[:2], source)
    return None, array is not None


class _Files(Dataset):
    def __init__(self, items: list[ScanItem], reader: FileReader) -> None:
        self.items, self.reader = items, reader

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> tuple[int, str | None, bool]:
        return k, *scan_file(self.items[k], self.reader)


def holds_large_images(paths: list[Path], reader: FileReader) -> bool:
    """Whether any of up to :data:`SAMPLE` files spread over ``paths`` is large enough to cache (headers only)."""
    if reader.cache is None or not paths:
        return False
    for k in np.unique(np.linspace(0, len(paths) - 1, min(SAMPLE, len(paths))).round().astype(int)):
        try:
            with open_image(paths[k], "image", reader.max_image_pixels) as im:
                if reader.cache.wants(im.size):
                    return True
        except DataError:
            continue  # the check or the load names it
    return False


def scan(items: list[ScanItem], reader: FileReader, num_workers: int, folder: Path) -> dict[int, str]:
    """Problems by item position. Under DDP each rank scans items ``rank::world_size`` and all ranks get every
    rank's problems; the ranks then wait at a barrier, so each reads a complete cache."""
    size, rank = world()
    problems: dict[int, str] = {}
    heavy: list[int] = []
    for k in tqdm(
        range(rank, len(items), size),
        desc=f"checking images in {folder}",
        leave=False,
        mininterval=2,
        disable=rank != 0,
    ):
        done, problem = quick(items[k], reader)
        if problem:
            problems[k] = problem
        elif not done:
            heavy.append(k)
    if heavy:
        n_cache = sum(items[k].cache for k in heavy)
        check_too = any(items[k].check in ("header", "full") for k in heavy)
        cache = reader.cache
        desc = (
            f"checking {len(heavy)} images in {folder}"
            if check_too or cache is None
            else f"caching resized copies of {n_cache} images in {cache.folder}"
        )
        files = _Files([items[k] for k in heavy], reader)
        workers = num_workers if len(heavy) >= MIN_FOR_WORKERS else 0
        loader = DataLoader(files, batch_size=8, num_workers=workers, collate_fn=list)
        cached = 0
        with tqdm(desc=desc, total=len(heavy), unit="image", mininterval=2, disable=rank != 0) as bar:
            for batch in loader:
                problems.update({heavy[j]: p for j, p, _ in batch if p})
                cached += sum(c for _, _, c in batch)
                bar.update(len(batch))
                if cached and check_too and cache is not None:
                    bar.set_description(f"{desc}, caching resized copies in {cache.folder}", refresh=False)
                    bar.set_postfix_str(f"{cached} cached", refresh=False)
    if size > 1 and dist.is_available() and dist.is_initialized():
        shares: list[dict[int, str]] = [{} for _ in range(size)]
        dist.all_gather_object(shares, problems)
        problems = {k: p for share in shares for k, p in share.items()}
        dist.barrier()
    return problems
