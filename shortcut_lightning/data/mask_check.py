"""The setup check that a mask column marks something: a sample of its masks, read by the mask rules."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from shortcut_lightning.data.file_reader import FileReader
from shortcut_lightning.errors import DataError

SAMPLE = 32  # masks read at setup, spread over the table


def check_masks_mark_something(
    pairs: list[tuple[Path, Path]], reader: FileReader, marks_core: bool, column: str, source: Path
) -> None:
    """Refuses a mask column whose sampled masks (``(mask, image)`` pairs, non-blank cells) are all empty, or,
    with ``mask_marks: core``, all cover the whole image (no spurious region is left)."""
    if not pairs:
        return
    picks = np.unique(np.linspace(0, len(pairs) - 1, min(SAMPLE, len(pairs))).round().astype(int))
    masks = [reader.peek_mask(*pairs[k]) for k in picks]
    folder = Path(os.path.commonpath([str(pairs[k][0].parent) for k in picks]))
    where = f"all {len(masks)} masks sampled from {folder} (column {column!r} of {source})"
    if not any(m.any() for m in masks):
        raise DataError(
            f"{where} are empty: are they stored in a form read as empty (docs/datasets.md, Masks, lists the forms "
            f"read), or is data.mask_threshold ({reader.mask_threshold}) too high?"
        )
    if marks_core and all(m.all() for m in masks):
        raise DataError(
            f"{where} cover the whole image, so with mask_marks: core (the mask marks the object) no spurious "
            "region is left: do they mark the spurious region instead (then set data.mask_marks: spurious)?"
        )
