"""``GroupDRO``: online group distributionally robust optimisation (Sagawa et al. 2020), as a loss weighting."""

from __future__ import annotations

from enum import Enum
from typing import Any

import lightning as L
import torch
from torch import Tensor

from shortcut_lightning.data.base import require_group_datamodule
from shortcut_lightning.errors import DataError, ShortcutError
from shortcut_lightning.stages import Stage


def exponentiated_gradient_step(
    q: Tensor, group_loss: Tensor, present: Tensor, step_size: float, adjustment: Tensor
) -> Tensor:
    """One update of the group weights: ``q_g <- q_g exp(step_size (L_g + C / sqrt(n_g)))`` for the groups
    present in the batch, then normalised (Sagawa et al. 2020, Algorithm 1, with the group adjustment)."""
    exponent = torch.where(present, step_size * (group_loss + adjustment), torch.zeros_like(group_loss))
    q = q * torch.exp(exponent)
    return q / q.sum()


class GroupDROPhase(str, Enum):
    """The plain mean loss before ``start_epoch``, then the group-weighted loss."""

    WAITING = "waiting"
    WEIGHTING = "weighting"


class GroupDRO(Stage):
    """Trains on the worst groups: the loss is ``sum_g q_g L_g``, ``L_g`` the batch's mean loss in group ``g``.

    Before each step the group weights ``q`` take one exponentiated-gradient step towards the groups with the
    higher loss (``step_size``); ``adjustment`` (the paper's ``C``) adds ``C / sqrt(n_g)`` to each group's
    loss for that step, ``n_g`` its training count, which favours the small groups, whose loss
    underestimates their true loss. It uses group labels on train (``[uses group annotations]``).

    It works through the loss seam (:class:`~shortcut_lightning.penalties.LossWeighting`): a module of yours
    calls :func:`~shortcut_lightning.penalties.weighted_loss` on its per-sample losses. Under DDP every rank
    all-reduces the batch's group sums and counts before the step, so ``q`` is the same on every rank and the
    loss is that of the global batch. ``q`` is logged per group (``groupdro/q/<group>``) and is part of the
    callback's state, so a resumed run continues from it.

    Example::

        trainer = L.Trainer(max_epochs=6, callbacks=[GroupDRO(step_size=0.01)])
        trainer.fit(ShortcutClassifier("resnet18"), datamodule=SyntheticShortcuts())

    Args:
        step_size: the exponentiated-gradient step (the paper's eta_q; 0.01 in its code).
        adjustment: the group adjustment ``C`` (0: none; the paper tunes it in {0, 1, 2, 3, 4, 5}).
        start_epoch: the first epoch with the weighted loss (before it, the plain mean).
    """

    stage_label = "GroupDRO"
    phases = GroupDROPhase
    transitions = ((GroupDROPhase.WAITING, GroupDROPhase.WEIGHTING),)
    start_hooks = ("epoch_start",)
    uses_annotations = True
    changes_model_at_fit_end = False  # a training regime: the CLI tests the checkpoint selected on val
    tested_file = "best"

    def __init__(self, step_size: float = 0.01, adjustment: float = 0.0, start_epoch: int = 0) -> None:
        if step_size <= 0:
            raise ShortcutError(f"GroupDRO step_size must be > 0, got {step_size}")
        if adjustment < 0:
            raise ShortcutError(f"GroupDRO adjustment (C) must be >= 0, got {adjustment}")
        super().__init__(start_epoch)
        self.step_size = step_size
        self.adjustment = adjustment
        self.q: Tensor | None = None
        self.steps = 0
        self._names: list[str] = []
        self._bonus: Tensor | None = None  # C / sqrt(n_g)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = require_group_datamodule(getattr(trainer, "datamodule", None), "GroupDRO")
        counts = dm.group_counts(dm.train_split).float()
        if dm.n_spurious < 2:
            raise DataError(
                "GroupDRO needs group labels on train (a spurious attribute with at least 2 values); this data "
                "has one group per class: give the metadata a spurious column (docs/datasets.md)"
            )
        self._names = list(dm.group_names)
        self._bonus = self.adjustment / counts.clamp(min=1).sqrt()
        if self.q is None or len(self.q) != len(counts):
            present = counts > 0
            self.q = present.float() / present.sum()  # uniform over the groups train has
        super().on_fit_start(trainer, pl_module)

    def start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.enter(GroupDROPhase.WEIGHTING)

    def sample_weights(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, losses: Tensor
    ) -> Tensor | None:
        if self.phase != GroupDROPhase.WEIGHTING or self.q is None:
            return None
        if "group" not in batch:
            raise DataError(
                "GroupDRO needs each batch's group labels (batch['group']): use a shortcut_lightning datamodule"
            )
        groups = batch["group"].to(losses.device)
        k = len(self.q)
        sums = torch.zeros(k, device=losses.device).index_add_(0, groups, losses.detach().float())
        counts = torch.bincount(groups, minlength=k).float()
        if trainer.world_size > 1:  # the global batch's group losses: the same q on every rank
            sums = trainer.strategy.reduce(sums, reduce_op="sum")
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        present = counts > 0
        group_loss = sums / counts.clamp(min=1)
        q = exponentiated_gradient_step(
            self.q.to(losses.device), group_loss, present, self.step_size, self._bonus.to(losses.device)
        )
        self.q, self.steps = q.detach().cpu(), self.steps + 1
        for name, value in zip(self._names, self.q.tolist(), strict=True):
            pl_module.log(f"groupdro/q/{name}", value, on_step=False, on_epoch=True, rank_zero_only=True)
        # sum_g q_g L_g over the global batch, as per-sample weights; times world_size for DDP's mean
        return trainer.world_size * q[groups] / counts[groups]

    def extra_state(self) -> dict[str, Any]:
        return {"q": self.q, "steps": self.steps}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.q, self.steps = state.get("q"), int(state.get("steps", 0))
