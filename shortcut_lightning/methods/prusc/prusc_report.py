"""What PruSC did, as a typed report; ``prusc.json`` is its :meth:`PruSCReport.to_dict`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class PruSCReport:
    """Filled as the stage goes: the clusters and the model before, then the masks' effect, then the end.

    ``before``/``fixed``/``after``: group reports per split of the model before the stage, with the masks
    fixed (only with fine-tuning), and at the end. ``best``: the mask-learning epoch kept by ``monitor``.
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

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready content of ``prusc.json`` (and of the callback's checkpointed state)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruSCReport:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
