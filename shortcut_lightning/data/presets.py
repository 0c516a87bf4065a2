"""Presets for the real benchmarks: names, mask conventions and (for CelebA) the native file layout."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from shortcut_lightning.data.metadata import SPLIT_CODES, MetadataDataModule, read_csv
from shortcut_lightning.errors import DataError


class Waterbirds(MetadataDataModule):
    """Waterbirds (Sagawa et al.) as released by group_DRO/WILDS: ``metadata.csv`` + image folders.

    Groups ``landbird_land, landbird_water, waterbird_land, waterbird_water`` (g = 2y + place).
    An optional ``mask_filename`` column points at CUB bird segmentations; the spurious region is
    everything outside the bird (``mask_marks="core"``).

    Example::

        dm = Waterbirds(root="~/data/waterbird_complete95_forest2water2", image_size=224)
    """

    holds = "metadata.csv and the bird images of waterbird_complete95_forest2water2"

    label_names: ClassVar[dict[str, Sequence[str]]] = {
        "target": ("landbird", "waterbird"),
        "spurious": ("land", "water"),
    }

    def __init__(self, root: str | None = None, mask_marks: str = "core", **kwargs: Any) -> None:
        super().__init__(root, mask_marks=mask_marks, **kwargs)


class ISIC(MetadataDataModule):
    """ISIC skin lesions, benign vs malignant, with the colour-patch shortcut (Le et al., XAI analysis of shortcut learning, Table 1).

    A ``metadata.csv`` in either schema with ``y`` (0 benign, 1 malignant) and the patch flag as
    ``place``/``a`` (1 = patch); ``mask_filename`` gives patch segmentations (empty for images
    without a patch). Malignant-with-patch usually has no training samples: worst-group accuracy
    skips empty groups.
    """

    holds = "metadata.csv and the ISIC images (see docs/datasets.md, ISIC)"

    label_names: ClassVar[dict[str, Sequence[str]]] = {
        "target": ("benign", "malignant"),
        "spurious": ("no_patch", "patch"),
    }

    def __init__(self, root: str | None = None, mask_marks: str = "spurious", **kwargs: Any) -> None:
        super().__init__(root, mask_marks=mask_marks, **kwargs)


class CelebA(MetadataDataModule):
    """CelebA in its Kaggle layout: ``list_attr_celeba.csv``, ``list_eval_partition.csv``, images.

    Target and spurious attribute are any two of the 40 attributes (default Blond_Hair vs Male, as
    in Sagawa et al.). Images are looked up in ``img_align_celeba/img_align_celeba/`` (the Kaggle
    archive) or ``img_align_celeba/``.
    """

    holds = "list_attr_celeba.csv, list_eval_partition.csv and img_align_celeba/"

    def __init__(
        self,
        root: str | None = None,
        target_attribute: str = "Blond_Hair",
        spurious_attribute: str = "Male",
        check_images: str = "exists",
        **kwargs: Any,
    ) -> None:
        self.target_attribute = target_attribute
        self.spurious_attribute = spurious_attribute
        self.label_names = {
            "target": (f"not_{target_attribute}", target_attribute),
            "spurious": (f"not_{spurious_attribute}", spurious_attribute),
        }
        super().__init__(root, check_images=check_images, **kwargs)

    def load_table(self) -> pd.DataFrame:
        attrs = read_csv(self.folder / "list_attr_celeba.csv")
        parts = read_csv(self.folder / "list_eval_partition.csv")
        for source, frame, needed in (
            ("list_attr_celeba.csv", attrs, ["image_id", self.target_attribute, self.spurious_attribute]),
            ("list_eval_partition.csv", parts, ["image_id", "partition"]),
        ):
            missing = [c for c in needed if c not in frame.columns]
            if missing:
                raise DataError(
                    f"{self.folder / source} lacks column(s) {', '.join(map(repr, missing))}; set "
                    "data.target_attribute / data.spurious_attribute to columns it has"
                )
        table = attrs.merge(parts, on="image_id", how="inner")
        images = self._image_folder()
        split = table["partition"].astype(str).map(SPLIT_CODES)
        if split.isna().any():
            raise DataError(
                f"column 'partition' of {self.folder / 'list_eval_partition.csv'} must hold 0/1/2 or train/val/test"
            )
        binary = table[[self.target_attribute, self.spurious_attribute]].replace(-1, 0)
        return pd.DataFrame(
            {
                "image": [str(images / i) for i in table["image_id"]],
                "target": self.read_labels(binary, self.target_attribute, "list_attr_celeba.csv", "target"),
                "spurious": self.read_labels(
                    binary, self.spurious_attribute, "list_attr_celeba.csv", "spurious"
                ),
                "split": split,
            }
        )

    def _image_folder(self) -> Path:
        for rel in ("img_align_celeba/img_align_celeba", "img_align_celeba"):
            if (self.folder / rel).is_dir():
                return Path(rel)
        raise DataError(
            f"{self.folder} has no img_align_celeba/ folder of images (see docs/datasets.md, CelebA)"
        )
