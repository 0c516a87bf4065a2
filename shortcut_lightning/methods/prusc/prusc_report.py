"""What PruSC did, as a typed report; ``prusc.json`` is its :meth:`PruSCReport.to_dict`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import lightning as L

from shortcut_lightning.methods.prusc.masks import density_summary
from shortcut_lightning.probing.embedding_pass import split_reports
from shortcut_lightning.probing.model_parts import find_head
from shortcut_lightning.reporting.stage_report import stage_tables


@dataclass
class PruSCReport:
    """Filled as the stage goes: the clusters and the model before, then the masks' effect, then the end.

    ``before``/``fixed``/``after``: group reports per split of the model before the stage, with the masks
    fixed (only with fine-tuning), and at the end. ``best``: the mask-learning epoch kept by ``monitor``;
    ``finetune_best``: the state kept with ``finetune_keep="best"``.
    ``densities``: the kept shares per layer and ``Prune_f``/``Prune_h``. ``None`` fields are left out of
    the JSON.
    """

    uses_annotations: bool
    clusters: list[dict[str, Any]]
    kmeans_inertia: float
    before: dict[str, dict[str, Any]]
    parameters: dict[str, Any]
    best: dict[str, Any] | None = None
    fixed: dict[str, dict[str, Any]] | None = None
    densities: dict[str, float] | None = None
    after: dict[str, dict[str, Any]] | None = None
    finetune_best: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready content of ``prusc.json`` (and of the callback's checkpointed state)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruSCReport:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def summary(self) -> list[str]:
        """The line the log shows above the tables: the pruned shares."""
        tag = " [uses group annotations]" if self.uses_annotations else ""
        return [f"PruSC{tag}: {density_summary(self.densities)}"]

    def tables(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Per split, the group reports before the stage, pruned and (with fine-tuning) tuned."""
        columns = {"before": self.before}
        if self.fixed is not None:  # fine-tuned after the masks were fixed
            columns.update(pruned=self.fixed, tuned=self.after)
        else:
            columns["pruned"] = self.after
        return stage_tables(columns)


def model_reports(
    pl_module: L.LightningModule, splits: Sequence[str], when: str
) -> dict[str, dict[str, Any]]:
    """The group report of each of ``splits`` for the model as it is now (``when``: its label in the log)."""
    dm, head = pl_module.trainer.datamodule, find_head(pl_module)
    return split_reports(pl_module, dm, head, splits, f"PruSC ({when}):")
