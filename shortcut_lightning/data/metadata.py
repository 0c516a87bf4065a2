"""``MetadataDataModule``: any folder of images described by a ``metadata.csv``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import pandas as pd
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from tqdm.auto import tqdm

from shortcut_lightning.data.base import SPLITS, GroupDataModule
from shortcut_lightning.data.datasets import FileImageDataset, GroupDataset
from shortcut_lightning.data.transforms import eval_transform, train_transform
from shortcut_lightning.errors import DataError

DATASETS_DOC = "docs/datasets.md"

SCHEMAS = {
    "waterbirds": {"image": "img_filename", "target": "y", "spurious": "place", "split": "split"},
    "subpopbench": {"image": "filename", "target": "y", "spurious": "a", "split": "split"},
}
SPLIT_CODES = {
    "0": "train", "1": "val", "2": "test",
    "train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test",
}  # fmt: skip
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


def integer_column(table: pd.DataFrame, column: str, source: str) -> pd.Series:
    """A column of non-negative integer labels; anything else is named with the offending value."""
    values = pd.to_numeric(table[column], errors="coerce")
    bad = values.isna() | (values < 0) | (values % 1 != 0)
    if bad.any():
        first = table[column][bad].iloc[0]
        raise DataError(
            f"column {column!r} of {source} must hold non-negative integer labels, but row "
            f"{int(bad.idxmax())} holds {first!r} ({int(bad.sum())} such rows)"
        )
    return values.astype(int)


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
        class_names, spurious_names: display names; default ``y<k>`` and ``a<k>``.
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
    ) -> None:
        super().__init__(root, image_size, batch_size, num_workers, sampler, seed, train_split)
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
                "target": integer_column(raw, columns["target"], str(source)),
                "spurious": integer_column(raw, columns["spurious"], str(source)),
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

    def default_names(self, column: str, n: int) -> list[str]:
        """Display names of the labels of ``column`` (``target`` or ``spurious``) when none are given."""
        preset = self.label_names.get(column, [])
        return (
            list(preset)
            if len(preset) >= n
            else [f"{'y' if column == 'target' else 'a'}{k}" for k in range(n)]
        )

    def _names(self, given: list[str] | None, column: str, arg: str) -> list[str]:
        n = int(self.table[column].max()) + 1
        if given is None:
            return self.default_names(column, n)
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
        if not self._checked and self.check_images != "none":
            self._drop_bad_images()
        super().setup(stage)

    def make_dataset(self, split: str, augment: bool) -> GroupDataset:
        rows = self.table[self.table["split"] == split]
        masks = None
        if "mask" in rows.columns:
            # an empty cell means the image has no spurious region
            masks = [None if pd.isna(m) or not str(m).strip() else self.folder / str(m) for m in rows["mask"]]
        transform = (
            train_transform(self.image_size) if augment and self.augment else eval_transform(self.image_size)
        )
        return FileImageDataset(
            [self.folder / p for p in rows["image"]],
            masks,
            mask_marks_core=self.mask_marks == "core",
            targets=torch.tensor(rows["target"].to_numpy()),
            spurious=torch.tensor(rows["spurious"].to_numpy()),
            n_spurious=self.n_spurious,
            transform=transform,
        )

    # -- image checks ---------------------------------------------------------------------------
    def _image_problem(self, path: Path) -> str | None:
        if not path.is_file():
            return "missing"
        if self.check_images == "exists":
            return None
        try:
            with Image.open(path) as im:
                if self.check_images == "full":
                    im.load()
                else:
                    im.verify()
        except Exception as exc:  # PIL raises many types for broken files
            return f"unreadable ({type(exc).__name__})"
        return None

    def _drop_bad_images(self) -> None:
        problems = {}
        for rel in tqdm(
            self.table["image"], desc=f"checking images in {self.folder}", leave=False, mininterval=2
        ):
            problem = self._image_problem(self.folder / rel)
            if problem:
                problems[rel] = problem
        if not problems:
            return
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
