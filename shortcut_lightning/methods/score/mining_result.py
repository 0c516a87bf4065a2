"""What SCORE's mining found, as a typed result; ``mining.json`` is its :meth:`MiningResult.to_dict`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from shortcut_lightning.methods.score.spurious_positives import mask_images


@dataclass
class MiningResult:
    """The neurons to regularise and how they were found.

    ``neurons`` is the union over the mining ``rounds`` (``{"epoch", "neurons"}`` each); ``classes`` holds,
    per class name, the top samples, the selected ones, their scores and the neurons they light up;
    ``before`` the group reports per split of the model before the first round (it describes the model
    before the stage, so later rounds keep it).
    """

    selection: str
    uses_annotations: bool
    layer: str
    neurons: list[int]
    classes: dict[str, dict[str, Any]]
    before: dict[str, dict[str, Any]]
    epoch: int
    rounds: list[dict[str, Any]] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready content of ``mining.json`` (and of the callback's checkpointed state)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MiningResult:
        """A result saved by :meth:`to_dict`; one saved before rounds were recorded gets its single round."""
        rounds = data.get("rounds") or [{"epoch": data["epoch"], "neurons": data["neurons"]}]
        return cls(**{**data, "rounds": rounds})


@dataclass
class SpuriousPairs:
    """The selected spurious-positive samples of the last mining round and their LRP masks (seed 002, Fig. 2:
    the (masked, original) pairs that are used for regularization).

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
        return {"indices": self.indices, "masks": self.masks, "fill": self.fill}
