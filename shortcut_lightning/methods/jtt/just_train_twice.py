"""``JustTrainTwice``: JTT (Liu et al. 2021), up-weighting the training samples an ERM model gets wrong."""

from __future__ import annotations

from enum import Enum
from typing import Any

import lightning as L
import torch
from torch import Tensor

from shortcut_lightning.data.base import require_group_datamodule
from shortcut_lightning.errors import ShortcutError
from shortcut_lightning.probing.embedding_pass import collect_embeddings
from shortcut_lightning.probing.model_parts import find_head
from shortcut_lightning.stages import Stage

DRAWS = ("upsample", "reweight")


def error_set(logits: Tensor, target: Tensor) -> Tensor:
    """Positions of the misclassified samples (JTT's error set), in the order of ``logits``."""
    return (logits.argmax(1) != target).nonzero().flatten()


class JTTPhase(str, Enum):
    """Identifying the error set (the ERM epochs), then training on it up-weighted."""

    IDENTIFYING = "identifying"
    UPWEIGHTING = "upweighting"


class JustTrainTwice(Stage):
    """Trains ERM for ``identify_epochs``, then up-weights the training samples it misclassifies by ``upweight``.

    At the end of epoch ``identify_epochs - 1`` the training split is predicted with evaluation transforms
    (eval mode; under DDP every rank gathers the whole split, so every rank has the same error set); the
    misclassified samples form the error set. From the next epoch on an error-set sample is seen ``upweight``
    times as often as another, for the rest of the fit, in one of two ways (``draw``):

    - ``upsample`` (the paper's, the default): each epoch is a shuffle of the upsampled set, every error-set
      sample in it ``upweight`` times and every other sample once, so an epoch grows by ``upweight - 1``
      times the error set (the datamodule's ``upsample`` contract). Mid-fit this changes the loader's
      length: give ``trainer.reload_dataloaders_every_n_epochs: 1`` when ``identify_epochs > 0``.
    - ``reweight``: epochs keep the split's length and draw with replacement by the weights (the
      datamodule's ``reweight`` contract): the same expected share per sample, at ERM's cost per epoch.

    No group labels are used: the groups of the error set are written to ``jtt.json`` for analysis only.
    The error set is part of the callback's state, so a resumed run draws as the killed one did.

    The paper retrains a second model from scratch on the up-weighted data; in this form the same model
    continues (give ``identify_epochs: 0`` with ``model.weights: erm.ckpt`` to identify with a trained model
    and start the up-weighted training from it).

    Example::

        jtt = JustTrainTwice(identify_epochs=2, upweight=20)  # upsampled, longer epochs after identifying
        trainer = L.Trainer(max_epochs=6, reload_dataloaders_every_n_epochs=1, callbacks=[jtt])
        trainer.fit(ShortcutClassifier("resnet18"), datamodule=SyntheticShortcuts())

    Args:
        identify_epochs: ERM epochs before the error set is built (0: at the start, from the loaded model).
        upweight: how much more often an error-set sample is seen (the paper's lambda_up, 5-100); a whole
            number with ``draw="upsample"``.
        draw: ``upsample`` (the paper's longer epochs) or ``reweight`` (epochs of the split's length).
        head: dotted name of the classifier head (default: found).
    """

    stage_label = "JTT"
    report_file = "jtt.json"
    phases = JTTPhase
    transitions = ((JTTPhase.IDENTIFYING, JTTPhase.UPWEIGHTING),)
    start_hooks = ("fit_start", "epoch_end")  # before the first up-weighted epoch's loader is built
    uses_annotations = False
    changes_model_at_fit_end = False  # a training regime: the CLI tests the checkpoint selected on val
    tested_file = "best"

    def __init__(
        self,
        identify_epochs: int = 1,
        upweight: float = 20.0,
        draw: str = "upsample",
        head: str | None = None,
    ) -> None:
        if upweight <= 0:
            raise ShortcutError(f"JTT upweight must be > 0, got {upweight}")
        if draw not in DRAWS:
            raise ShortcutError(f"JTT draw {draw!r} is unknown: choose one of {', '.join(DRAWS)}")
        if draw == "upsample" and upweight != int(upweight):
            raise ShortcutError(f"JTT upweight must be a whole number with draw='upsample', got {upweight}")
        if identify_epochs < 0:
            raise ShortcutError(f"JTT identify_epochs must be >= 0, got {identify_epochs}")
        super().__init__(start_epoch=identify_epochs)  # the error set is built before this epoch
        self.identify_epochs = identify_epochs
        self.upweight = upweight
        self.draw = draw
        self.head = head
        self.errors: Tensor | None = None  # dataset positions of the error set

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        require_group_datamodule(getattr(trainer, "datamodule", None), "JustTrainTwice")
        if (
            trainer.max_epochs is not None
            and trainer.max_epochs >= 0
            and self.identify_epochs >= trainer.max_epochs
        ):
            raise ShortcutError(
                f"JTT identify_epochs={self.identify_epochs} leaves no up-weighted epoch in max_epochs="
                f"{trainer.max_epochs}: give identify_epochs < max_epochs"
            )
        if (
            self.draw == "upsample"
            and self.identify_epochs > 0
            and trainer.reload_dataloaders_every_n_epochs != 1
        ):
            raise ShortcutError(
                "JTT draw='upsample' after identify_epochs > 0 lengthens the epochs mid-fit: give "
                "trainer.reload_dataloaders_every_n_epochs: 1 (or draw='reweight')"
            )
        super().on_fit_start(trainer, pl_module)

    def start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.identify(trainer, pl_module)

    def resume(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Resumed after identification: the loader is built from the error set's weights."""
        self.point_sampler(trainer.datamodule)

    def weights(self, n: int) -> Tensor:
        """Per-sample draw weights over the training split: ``upweight`` on the error set, 1 elsewhere."""
        w = torch.ones(n)
        w[self.errors] = float(self.upweight)
        return w

    def point_sampler(self, dm: Any) -> None:
        """Hands the error set's up-weighting to the datamodule, as ``draw`` says."""
        w = self.weights(len(dm.dataset(dm.train_split)))
        if self.draw == "upsample":
            dm.upsample(w.long(), "JustTrainTwice")
        else:
            dm.reweight(w, "JustTrainTwice")

    def identify(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Tensor:
        """Builds the error set with the current model and points the training sampler at the up-weighting."""
        dm = trainer.datamodule
        split = dm.train_split
        head = find_head(pl_module, self.head)
        found = collect_embeddings(  # the logits decide: no rank keeps the features
            pl_module, dm.dataloader(split), head, desc=f"JTT: predicting {split}", features="none"
        )
        wrong = error_set(found.logits, found.target)
        self.errors = found.index[wrong]
        self.enter(JTTPhase.UPWEIGHTING)
        self.point_sampler(dm)
        groups = found.group[wrong]
        make_up = {name: int((groups == g).sum()) for g, name in enumerate(dm.group_names)}
        self.report = {
            "uses_annotations": False,
            "epoch": trainer.current_epoch,
            "split": split,
            "upweight": self.upweight,
            "draw": self.draw,
            "n_train": len(found),
            "n_errors": len(self.errors),
            "error_indices": self.errors.tolist(),
            "error_groups_for_analysis": make_up,
        }
        summary = (
            f"JTT: {len(self.errors)} of {len(found)} {split} samples misclassified, {self.draw}d {self.upweight:g}x "
            f"from the next epoch on (groups, for analysis: {make_up})"
        )
        self.write_report(trainer, self.report, [summary])
        return self.errors

    def extra_state(self) -> dict[str, Any]:
        return {"errors": self.errors}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.errors = state.get("errors")
        if self.errors is not None:  # a checkpoint of before the Stage base has no phase
            self.phase = JTTPhase.UPWEIGHTING
