"""What PruSC did, as a typed report; ``prusc.json`` is its :meth:`PruSCReport.to_dict`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from shortcut_lightning.methods.prusc.masks import density_summary
from shortcut_lightning.reporting.stage_report import stage_tables, write_stage_report


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

    def write(self, log_dir: Path) -> None:
        """``prusc.json`` and the printed before/pruned(/tuned) group tables."""
        tag = " [uses group annotations]" if self.uses_annotations else ""
        columns = {"before": self.before}
        if self.fixed is not None:  # fine-tuned after the masks were fixed
            columns.update(pruned=self.fixed, tuned=self.after)
        else:
            columns["pruned"] = self.after
        summary = [f"PruSC{tag}: {density_summary(self.densities)}"]
        write_stage_report(log_dir, "prusc.json", self.to_dict(), summary, stage_tables(columns))
