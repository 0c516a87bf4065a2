"""What SCORE's mining found, typed; ``mining.json`` is its :meth:`MiningResult.to_dict`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from shortcut_lightning.methods.score.spurious_positives import mask_images

ORACLE_TAG = " [oracle: uses spurious annotations]"  # on every line and file of a run that reads annotations


@dataclass
class ClassReport:
    """One class's entry of ``mining.json``: its top samples by logit, the selected ones and their neurons.

    ``selection_scores`` is ``None`` for ``manual``; ``neuron_scores`` is ``None`` when no sample was selected;
    ``lrp_mask_overlap_with_spurious_region`` (mean over the top samples) exists where the data has spurious
    masks, and ``precision_vs_oracle`` (share of the selected samples the ``oracle`` rule accepts) where it
    has them and a sample was selected. A ``None`` of the last three is left out of the JSON.
    """

    top_indices: list[int]
    selected_indices: list[int]
    masked_prediction_kept: int
    selection_scores: list[float] | None
    neurons: list[int]
    neuron_scores: list[float] | None = None
    lrp_mask_overlap_with_spurious_region: float | None = None
    precision_vs_oracle: float | None = None
    layer_scores: list[float] | None = None  # every channel's score: how many a z or a share would take

    def to_dict(self) -> dict[str, Any]:
        """The JSON entry, its keys in the order ``mining.json`` has always had."""
        data: dict[str, Any] = {
            "top_indices": list(self.top_indices),
            "selected_indices": list(self.selected_indices),
            "masked_prediction_kept": self.masked_prediction_kept,
            "selection_scores": None if self.selection_scores is None else list(self.selection_scores),
        }
        for key in ("lrp_mask_overlap_with_spurious_region", "precision_vs_oracle"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        data["neurons"] = list(self.neurons)
        if self.neuron_scores is not None:
            data["neuron_scores"] = list(self.neuron_scores)
        if self.layer_scores is not None:
            data["layer_scores"] = list(self.layer_scores)
        return data


@dataclass
class MiningRound:
    """One mining round: the epoch it ran before and the neurons it selected."""

    epoch: int
    neurons: list[int]


@dataclass
class MiningResult:
    """The neurons to regularise and how they were found.

    ``neurons`` is the union over the mining ``rounds``; ``classes`` holds, per class name, the top samples,
    the selected ones, their scores and the neurons they light up; ``before`` the group reports per split
    of the model before the first round (it describes the model before the stage, so later rounds keep it).
    """

    selection: str
    uses_annotations: bool
    layer: str
    neurons: list[int]
    classes: dict[str, ClassReport]
    before: dict[str, dict[str, Any]]
    epoch: int
    rounds: list[MiningRound] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready content of ``mining.json`` (and of the callback's checkpointed state)."""
        data = asdict(self)
        data["classes"] = {name: entry.to_dict() for name, entry in self.classes.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MiningResult:
        """A result saved by :meth:`to_dict`; one saved before rounds were recorded gets its single round."""
        rounds = data.get("rounds") or [{"epoch": data["epoch"], "neurons": data["neurons"]}]
        return cls(
            **{
                **data,
                "classes": {name: ClassReport(**entry) for name, entry in data["classes"].items()},
                "rounds": [MiningRound(**r) for r in rounds],
            }
        )

    def neurons_by_class(self, class_names: list[str]) -> dict[int, list[int]]:
        """Per class index, the neurons mined for it: its entry's neurons (the last round's), and the neurons of
        earlier rounds that no class entry names now added to every class, so the classes' union is
        :attr:`neurons`."""
        per_class = {
            class_names.index(name): sorted(entry.neurons)
            for name, entry in self.classes.items()
            if entry.neurons and name in class_names
        }
        classes = per_class or {c: [] for c in range(max(1, len(class_names)))}
        named = {n for chosen in per_class.values() for n in chosen}
        orphans = [n for n in self.neurons if n not in named]
        return {c: sorted({*chosen, *orphans}) for c, chosen in classes.items()}

    def summary(self) -> list[str]:
        """The lines the log shows: the neurons (and the last round's, after the first), each class's picks."""
        tag = ORACLE_TAG if self.uses_annotations else ""
        rounds = self.rounds
        new = f" (round {len(rounds)}: {rounds[-1].neurons})" if len(rounds) > 1 else ""
        lines = [f"SCORE mining{tag} at {self.layer}: neurons {self.neurons}{new}"]
        for name, entry in self.classes.items():
            precision = entry.precision_vs_oracle
            extra = "" if precision is None else f", precision vs oracle {precision:.2f}"
            lines.append(f"  {name}: selected {entry.selected_indices}{extra}")
        return lines


@dataclass
class SpuriousPairs:
    """The selected spurious-positive samples of the last mining round and their LRP masks: the (original,
    masked) pairs that "Shortcut Mitigation via Spurious-Positive Samples" regularises on (its Fig. 2).

    ``indices`` are training-set indices, ``masks`` [n,1,H,W] bool. Kept in the miner's checkpointed state,
    not in ``mining.json``.
    """

    indices: list[int]
    masks: Tensor
    fill: float = 0.0

    def images(self, dataset: Any) -> Tensor:
        """Originals then masked images [2n,3,H,W] of ``dataset`` (evaluation transforms)."""
        originals = torch.stack([dataset[i]["image"] for i in self.indices])
        return torch.cat([originals, mask_images(originals, self.masks, self.fill)])

    def state(self) -> dict[str, Any]:
        """The checkpointed form (the constructor's arguments)."""
        return {"indices": self.indices, "masks": self.masks, "fill": self.fill}
