"""The one way a stage reports: its JSON beside the logs, and its summary and group tables as one log record."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only

from shortcut_lightning.metrics import format_group_table

log = logging.getLogger(__name__)


def stage_tables(columns: Mapping[str, Mapping[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per split, the reports of each column (``{"before": {split: r}, "DFR": {split: r}}`` -> per split)."""
    first = next(iter(columns.values()), {})
    return {split: {label: reports[split] for label, reports in columns.items()} for split in first}


@rank_zero_only
def write_stage_report(
    log_dir: Path,
    filename: str,
    report: Mapping[str, Any],
    summary: Sequence[str] = (),
    tables: Mapping[str, Mapping[str, dict[str, Any]]] | None = None,
) -> Path:
    """Writes ``report`` to ``log_dir/filename`` (JSON) and logs ``summary`` and one group table per split.

    ``tables`` maps a split to its columns (label -> group report, e.g. before and after the stage);
    see :func:`stage_tables`. Runs on rank 0 only; returns the JSON's path. The summary and tables are one
    info record of this module's logger, so the ``shortcut_lightning`` logger's level shows or silences them.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / filename
    path.write_text(json.dumps(report, indent=2))
    parts = ["\n".join(summary)] if summary else []
    parts += [format_group_table(columns) for columns in (tables or {}).values()]
    if parts:
        log.info("\n" + "\n\n".join(parts) + "\n")
    return path
