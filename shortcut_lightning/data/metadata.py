"""``MetadataDataModule``: any folder of images described by a ``metadata.csv``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import pandas as pd
import torch
from lightning.pytorch.utilities import rank_zero_warn

from shortcut_lightning.data.base import SPLITS, STAGE_SPLITS, GroupDataModule
from shortcut_lightning.data.datasets import FileImageDataset, GroupDataset
from shortcut_lightning.data.file_reader import FileReader
from shortcut_lightning.data.file_scan import ScanItem, holds_large_images, scan
from shortcut_lightning.data.labels import default_label_names, label_column
from shortcut_lightning.data.mask_check import check_masks_mark_something
from shortcut_lightning.data.resize_cache import ResizeCache, cache_folder, cache_side
from shortcut_lightning.data.transforms import eval_transform, train_transform
from shortcut_lightning.errors import DataError

DATASETS_DOC = "docs/datasets.md"

SCHEMAS = {
    "waterbirds": {"image": "img_filename", "target": "y", "spurious": "place", "split": "split"},
    "subpopbench": {"image": "filename", "target": "y", "spurious": "a", "split": "split"},
}
SPLIT_CODES = {
    "0": "train",
    "1": "val",
    "2": "test",
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}
CHECKS = ("none", "exists", "header", "full")
MASK_MARKS = ("spurious", "core")


def require_folder(root: str | Path | None, holds: str) -> Path:
    """The data folder as a Path; a missing one fails at once, naming it and the layout doc."""
    if root is None:
        raise DataError(
            f"data.root is not set: point it at the folder that holds {holds} (see {DATASETS_DOC})"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(
            f"data folder {path} does not exist: set data.root to the folder that holds {holds} "
            f"(see {DATASETS_DOC} for the layout)"
        )
    return path


def read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path} is missing: the data folder must hold it (see {DATASETS_DOC})")
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a readable CSV file: {exc}") from exc


class MetadataDataModule(GroupDataModule):
    """Images listed in ``<root>/<metadata>``, in the Waterbirds/WILDS or the SubpopBench schema.

    Waterbirds/WILDS columns ``img_filename, y, split, place``; SubpopBench ``filename, y, a, split``.
    Split codes ``0/1/2`` or ``train/val/test``. An optional ``mask_filename`` column gives the
    spurious-region mask of each image (empty cell: no spurious region). Explicit ``*_column``
    arguments override the detected schema. Paths are relative to ``root``.

    Args:
        metadata: name of the table inside ``root``.
        image_column, target_column, spurious_column, split_column: override the schema's columns.
        mask_column: column of mask paths (used when present).
        mask_marks: ``spurious`` (the mask marks the spurious region, e.g. ISIC patches) or ``core``
            (it marks the object, e.g. CUB bird segmentations; the spurious region is the rest).
        check_images: before training, ``exists`` checks every file exists, ``header`` also opens
            it, ``full`` decodes it, ``none`` skips the check. Bad files are skipped with a warning
            that names them and counts them, unless more than ``max_bad_images`` of all are bad.
        max_bad_images: largest share of bad images to skip rather than fail.
        augment: random resized crop and flip on training images.
        class_names, spurious_names: display names; default ``y<v>`` and ``a<v>`` with ``v`` the file's value.
            Labels that are not ``0..K-1`` (1/2, -1/1) are read in sorted order as ``0..K-1`` (logged).
        mask_threshold: a mask pixel is set where its value exceeds this share of the format's maximum
            (0: non-zero; 0.5 suits JPEG masks).
        max_image_pixels: the largest image read, in pixels (None: Pillow's guard, 2 x 89,478,485).
        resize_cache: where resized copies of large images are kept: ``auto`` (``$SHORTCUT_LIGHTNING_CACHE``,
            else ``~/.cache/shortcut_lightning/resized``), a folder, or ``off``/None.
    """

    holds = "metadata.csv and the images it lists"
    label_names: ClassVar[dict[str, Sequence[str]]] = {}

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 4,
        sampler: str = "default",
        seed: int = 0,
        metadata: str = "metadata.csv",
        image_column: str | None = None,
        target_column: str | None = None,
        spurious_column: str | None = None,
        split_column: str | None = None,
        mask_column: str = "mask_filename",
        mask_marks: str = "spurious",
        check_images: str = "header",
        max_bad_images: float = 0.01,
        augment: bool = True,
        class_names: list[str] | None = None,
        spurious_names: list[str] | None = None,
        train_split: str = "train",
        mask_threshold: float = 0.0,
        max_image_pixels: int | None = None,
        resize_cache: str | None = "auto",
    ) -> None:
        super().__init__(root, image_size, batch_size, num_workers, sampler, seed, train_split)
        if not 0 <= mask_threshold < 1:
            raise DataError(
                f"data.mask_threshold must lie in [0, 1), got {mask_threshold}: a mask pixel is set where its value "
                "exceeds this share of the format's maximum (0: non-zero, 0.5 for JPEG masks)"
            )
        if max_image_pixels is not None and max_image_pixels < 1:
            raise DataError(
                f"data.max_image_pixels must be at least 1 (or null: Pillow's limit), got {max_image_pixels}"
            )
        if check_images not in CHECKS:
            raise DataError(
                f"data.check_images {check_images!r} is unknown: choose one of {', '.join(CHECKS)}"
            )
        if mask_marks not in MASK_MARKS:
            raise DataError(
                f"data.mask_marks {mask_marks!r} is unknown: choose one of {', '.join(MASK_MARKS)}"
            )
        self.folder = require_folder(root, self.holds)
        self.metadata = metadata
        self.columns = {
            "image": image_column,
            "target": target_column,
            "spurious": spurious_column,
            "split": split_column,
        }
        self.mask_column = mask_column
        self.mask_marks = mask_marks
        self.check_images = check_images
        self.max_bad_images = max_bad_images
        self.augment = augment
        folder = cache_folder(resize_cache)
        self.reader = FileReader(
            None if folder is None else ResizeCache(folder, cache_side(image_size)),
            max_image_pixels,
            mask_threshold,
        )
        self._cached_splits: set[str] = set()
        self._label_values: dict[str, tuple[int, ...]] = {}
        self.table = self.load_table()
        self._class_names = self._names(class_names, "target", "class_names")
        self._spurious_names = self._names(spurious_names, "spurious", "spurious_names")

    # -- the table ------------------------------------------------------------------------------
    def load_table(self) -> pd.DataFrame:
        """Rows with columns ``image, target, spurious, split`` (and ``mask``), validated."""
        source = self.folder / self.metadata
        raw = read_csv(source)
        columns = self._resolve_columns(raw, source)
        table = pd.DataFrame(
            {
                "image": raw[columns["image"]].astype(str),
                "target": self.read_labels(raw, columns["target"], str(source), "target"),
                "spurious": self.read_labels(raw, columns["spurious"], str(source), "spurious"),
                "split": self._split_names(raw[columns["split"]], columns["split"], source),
            }
        )
        if self.mask_column in raw.columns:
            table["mask"] = raw[self.mask_column]
        return table

    def _resolve_columns(self, raw: pd.DataFrame, source: Path) -> dict[str, str]:
        present = set(raw.columns)
        # the schema whose columns the file has most of, so a missing column is named in its own schema
        schema = max(
            SCHEMAS.values(), key=lambda sc: sum(bool(self.columns[k]) or v in present for k, v in sc.items())
        )
        resolved = {k: self.columns[k] or v for k, v in schema.items()}
        missing = [c for c in resolved.values() if c not in present]
        if missing:
            raise DataError(
                f"{source} lacks column(s) {', '.join(map(repr, missing))}; it has {', '.join(raw.columns)}. "
                "Use the Waterbirds/WILDS schema (img_filename, y, split, place) or the SubpopBench schema "
                "(filename, y, a, split), or name your columns with data.image_column, data.target_column, "
                "data.spurious_column and data.split_column"
            )
        return resolved

    @staticmethod
    def _split_names(column: pd.Series, name: str, source: Path) -> pd.Series:
        codes = column.astype(str).str.strip().str.lower().str.replace(r"\.0$", "", regex=True)
        unknown = sorted(set(codes) - set(SPLIT_CODES))
        if unknown:
            raise DataError(
                f"column {name!r} of {source} holds unknown split code(s) {', '.join(unknown)}: use 0/1/2 or "
                "train/val/test"
            )
        return codes.map(SPLIT_CODES)

    def read_labels(self, table: pd.DataFrame, column: str, source: str, role: str) -> pd.Series:
        """Codes ``0..K-1`` of the labels in ``column`` for ``role`` (``target`` or ``spurious``); values that are
        not ``0..K-1`` are read in sorted order (logged), over the whole table so every split agrees."""
        what = "classes" if role == "target" else "spurious values"
        labels = label_column(table, column, source, what, known=len(self.label_names.get(role, ())))
        self._label_values[role] = labels.values
        return labels.codes

    def default_names(self, column: str, n: int) -> list[str]:
        """Display names of the labels of ``column`` (``target`` or ``spurious``) when none are given."""
        values = self._label_values.get(column, ())
        if len(values) != n:
            values = tuple(range(n))
        return default_label_names(
            values, self.label_names.get(column, ()), "y" if column == "target" else "a"
        )

    def _names(self, given: list[str] | None, column: str, arg: str) -> list[str]:
        values = self._label_values.get(column) or tuple(range(int(self.table[column].max()) + 1))
        n = len(values)
        if given is None:
            return self.default_names(column, n)
        if values != tuple(range(n)) and len(given) != n:
            raise DataError(
                f"data.{arg} names {len(given)} values but column {column!r} holds {n} "
                f"({', '.join(map(str, values))}, read in that order): give one name per value"
            )
        if len(given) < n:
            raise DataError(
                f"data.{arg} names {len(given)} values but column {column!r} has labels up to {n - 1}"
            )
        return list(given)

    # -- the contract ---------------------------------------------------------------------------
    @property
    def splits(self) -> tuple[str, ...]:
        present = set(self.table["split"])
        return tuple(s for s in SPLITS if s in present)

    @property
    def class_names(self) -> Sequence[str]:
        return self._class_names

    @property
    def spurious_names(self) -> Sequence[str]:
        return self._spurious_names

    def setup(self, stage: str) -> None:
        first = not self._checked
        check = self.check_images if first else "none"
        to_cache = [] if self.reader.cache is None else self._uncached_splits(stage)
        if check != "none" or to_cache:
            self._scan(check, to_cache)
        if first and "mask" in self.table.columns:
            masks = self._mask_paths(self.table)
            pairs = [
                (m, self.folder / p) for m, p in zip(masks, self.table["image"], strict=True) if m is not None
            ]
            check_masks_mark_something(
                pairs, self.reader, self.mask_marks == "core", self.mask_column, self.folder / self.metadata
            )
        super().setup(stage)

    def _mask_paths(self, rows: pd.DataFrame) -> list[Path | None]:
        # an empty cell means the image has no spurious region
        return [None if pd.isna(m) or not str(m).strip() else self.folder / str(m) for m in rows["mask"]]

    def make_dataset(self, split: str, augment: bool) -> GroupDataset:
        rows = self.table[self.table["split"] == split]
        masks = self._mask_paths(rows) if "mask" in rows.columns else None
        transform = (
            train_transform(self.image_size) if augment and self.augment else eval_transform(self.image_size)
        )
        return FileImageDataset(
            [self.folder / p for p in rows["image"]],
            masks,
            mask_marks_core=self.mask_marks == "core",
            reader=self.reader,
            targets=torch.tensor(rows["target"].to_numpy()),
            spurious=torch.tensor(rows["spurious"].to_numpy()),
            n_spurious=self.n_spurious,
            transform=transform,
        )

    # -- image checks and the resized cache -----------------------------------------------------
    def _uncached_splits(self, stage: str) -> list[str]:
        needed = {*STAGE_SPLITS[stage], self.train_split} if stage == "fit" else set(STAGE_SPLITS[stage])
        return [s for s in self.splits if s in needed and s not in self._cached_splits]

    def _scan(self, check: str, to_cache: list[str]) -> None:
        """One pass: the image check (first setup) and the resized copies of the splits ``to_cache``."""
        table = self.table
        paths = [self.folder / p for p in table["image"]]
        cache = table["split"].isin(to_cache).to_numpy().copy()  # pandas may hand over a read-only view
        sampled = [p for p, c in zip(paths, cache, strict=True) if c]
        # without a header check no header is read anyway: a sample says whether any image is large
        if sampled and check in ("none", "exists") and not holds_large_images(sampled, self.reader):
            cache[:] = False
        masks = self._mask_paths(table) if "mask" in table.columns else [None] * len(table)
        items = [ScanItem(p, check, bool(c), m) for p, c, m in zip(paths, cache, masks, strict=True)]
        problems = scan(items, self.reader, self.num_workers, self.folder)
        self._cached_splits.update(to_cache)
        if problems:
            self._drop_bad_images({table["image"].iloc[k]: why for k, why in sorted(problems.items())})

    def _drop_bad_images(self, problems: dict[str, str]) -> None:
        listed = "; ".join(f"{p} ({why})" for p, why in list(problems.items())[:5])
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        n = len(self.table)
        if len(problems) > self.max_bad_images * n:
            raise DataError(
                f"{len(problems)} of {n} images listed in {self.folder / self.metadata} are missing or unreadable: "
                f"{listed}{more}. Is data.root the folder the paths are relative to? "
                f"(data.max_bad_images={self.max_bad_images} allows skipping up to that share)"
            )
        rank_zero_warn(
            f"skipped {len(problems)} of {n} images that are missing or unreadable: {listed}{more}. "
            "Fix or remove them to train on every row."
        )
        self.table = self.table[~self.table["image"].isin(problems)].reset_index(drop=True)
        self._datasets.clear()
