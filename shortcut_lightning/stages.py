"""The Stage contract: what the CLI (or a script of yours) may ask of a method's callback.

A stage is a Lightning callback that changes or diagnoses a trained model (DFR, PruSC, SCORE's mining,
the s-score). :class:`Stage` declares what a runner reads from it; :class:`ModelStage` is the base of the
stages that act once on a trained model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import lightning as L
from lightning.pytorch.callbacks import Callback


@runtime_checkable
class Stage(Protocol):
    """What the ``shortcut`` CLI asks of a stage callback.

    - ``stage_label``: the name its tables carry (``"DFR"``).
    - ``uses_annotations``: whether it reads group or spurious labels of the training data.
    - ``changes_model_at_fit_end``: the model in memory after ``fit`` is the stage's result (DFR's head,
      PruSC's pruned network), so the test pass after ``fit`` tests it, not the best checkpoint.
    - ``before_reports``: group reports per split of the model before the stage changed it (empty
      until it ran); the CLI prints the test split beside the test pass after ``fit``.
    """

    @property
    def stage_label(self) -> str: ...

    @property
    def uses_annotations(self) -> bool: ...

    @property
    def changes_model_at_fit_end(self) -> bool: ...

    @property
    def before_reports(self) -> dict[str, dict[str, Any]]: ...


class ModelStage(Callback):
    """Runs :meth:`run` at the end of ``fit``, or once before ``validate``/``test``.

    Before an evaluation it runs again whenever weights were just loaded from a checkpoint
    (``trainer.ckpt_path``); on the in-memory model it runs once, so the test pass right after ``fit``
    evaluates the model the stage already changed instead of changing it twice.

    Subclasses implement :meth:`run` and the :class:`Stage` members. With ``checkpoint_name`` set, the
    model the stage changed at the end of ``fit`` is saved as ``checkpoints/<checkpoint_name>.ckpt``.
    :attr:`result` (what :meth:`run` reported) is the resumable state: a resumed run keeps its "before"
    reports.
    """

    checkpoint_name: str | None = None

    def __init__(self) -> None:
        self._ran_in_memory = False
        self.result: dict[str, Any] = {}

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        raise NotImplementedError

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        result = self.run(trainer, pl_module)
        self._ran_in_memory = True
        return result

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run(trainer, pl_module)
        if self.checkpoint_name is not None:  # trainer.log_dir is a collective under DDP: every rank asks
            log_dir = Path(trainer.log_dir or trainer.default_root_dir)
            trainer.save_checkpoint(
                log_dir / "checkpoints" / f"{self.checkpoint_name}.ckpt", weights_only=False
            )

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._before_evaluation(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._before_evaluation(trainer, pl_module)

    def _before_evaluation(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is not None or not self._ran_in_memory:
            self._run(trainer, pl_module)

    # -- resumable state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"result": self.result}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.result = state_dict.get("result", {})


T = TypeVar("T")


def decide_on_rank_zero(trainer: L.Trainer, decide: Callable[[], T]) -> T:
    """``decide()`` on rank 0, its result broadcast to every rank: one decision under DDP by construction.

    An error raised by ``decide`` travels with the broadcast and is raised on every rank, so no rank is
    left waiting at a collective that rank 0 never reaches (a data error in DFR's refit, say).
    """
    outcome: tuple[T | None, BaseException | None] = (None, None)
    if trainer.is_global_zero:
        try:
            outcome = (decide(), None)
        except Exception as error:  # carried to every rank, raised below
            outcome = (None, error)
    if trainer.world_size > 1:
        outcome = trainer.strategy.broadcast(outcome, src=0)
    result, error = outcome
    if error is not None:
        raise error
    return result  # type: ignore[return-value]
