"""Label columns as users have them: integer codes of any values (1/2, -1/1, 0/2) read as classes 0..K-1."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from shortcut_lightning.errors import DataError
from shortcut_lightning.reporting.rank_zero_log import rank_zero_log

log = logging.getLogger(__name__)

SHOWN = 12  # values a log line or an error lists before "..."


@dataclass(frozen=True)
class LabelColumn:
    """A column's labels as codes ``0..K-1`` (``codes``) and the file's value of each code (``values``)."""

    codes: pd.Series
    values: tuple[int, ...]

    @property
    def remapped(self) -> bool:
        """Whether the file's values differ from the codes (then names default to the file's values)."""
        return self.values != tuple(range(len(self.values)))


def _listed(items: list[str]) -> str:
    return ", ".join(items[:SHOWN]) + (", ..." if len(items) > SHOWN else "")


def label_column(
    table: pd.DataFrame, column: str, source: str, what: str = "classes", known: int = 0
) -> LabelColumn:
    """Integer labels of ``column``; values that are not exactly ``0..K-1`` are read in sorted order as ``0..K-1``.

    The mapping is logged once. ``known``: the size of a preset's label space (its names): values inside
    ``0..known-1`` keep their code, so a preset's names keep their meaning when a value is absent. Text,
    fractions and empty cells are refused with the values found.
    """
    raw = table[column]
    numbers = pd.to_numeric(raw, errors="coerce")
    bad = numbers.isna() | (numbers % 1 != 0)
    if bad.any():
        found = list(dict.fromkeys("an empty cell" if pd.isna(v) else repr(v) for v in raw[bad]))
        raise DataError(
            f"column {column!r} of {source} must hold integer labels, but {int(bad.sum())} row(s) hold "
            f"{_listed(found)} (first in row {int(bad.to_numpy().argmax())}, 0-based data row): write one integer "
            "per row, or name another column"
        )
    ints = numbers.astype(np.int64)
    values = sorted(int(v) for v in ints.unique())
    if not values:
        return LabelColumn(ints, ())
    if values == list(range(len(values))) or (known and values[0] >= 0 and values[-1] < known):
        return LabelColumn(ints, tuple(range(values[-1] + 1)))
    mapping = {v: k for k, v in enumerate(values)}
    pairs = [f"{v}->{k}" for v, k in mapping.items()]
    rank_zero_log(
        log,
        f"column {column!r} of {source} holds {_listed([str(v) for v in values])}: read as {what} "
        f"{_listed([str(k) for k in mapping.values()])} ({_listed(pairs)})",
    )
    return LabelColumn(ints.map(mapping).astype(np.int64), tuple(values))


def default_label_names(
    values: tuple[int, ...], preset: tuple[str, ...] | list[str], prefix: str
) -> list[str]:
    """Display names: the preset's when it names every code, else ``<prefix><value in the file>``."""
    n = len(values)
    if len(preset) >= n:
        return list(preset) if values == tuple(range(n)) else list(preset[:n])
    return [f"{prefix}{v}" for v in values]
