"""The stage lifecycle: one base class that every method's callback (DFR, PruSC, SCORE, ...) builds on.

As Lightning's ``BaseFinetuning`` owns its subclasses' freezing and zennit's ``Canonizer`` its hooks'
undoing, :class:`Stage` owns what every stage has: the members a runner reads (declared on the class and
checked when a subclass is defined), ``start_epoch`` gating, phases with their transitions, the resumable
state (phase and report), the one way to write a report and to save a checkpoint, and which checkpoint
holds the model the test after ``fit`` tests. :class:`ModelStage` is the base of the stages that act once
on a trained model (DFR, AFR, the s-score, BatchNorm re-estimation).

=========================  ====================================================================
lifecycle step             what the base does, and the hook a stage overrides
=========================  ====================================================================
definition                 checks the declarations (``stage_label``, ``phases``, ``transitions``, ...)
``on_fit_start``           :meth:`Stage.resume` after a restored phase, else a due :meth:`Stage.start`
``on_train_epoch_start``   a due :meth:`Stage.start` (``start_hooks`` says where a stage may start)
``on_train_epoch_end``     a :meth:`Stage.start` due at the next epoch (before its loader is built)
phase change               :meth:`Stage.enter` refuses a transition the stage did not declare
report and checkpoint      :meth:`Stage.write_report`, :meth:`Stage.save_checkpoint`
the test after ``fit``     :meth:`Stage.tested_checkpoint` (the ``shortcut`` CLI and ``bench/`` ask it)
``state_dict``             phase, report and :meth:`Stage.extra_state`
=========================  ====================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import lightning as L
from lightning.pytorch.callbacks import Callback

from shortcut_lightning.errors import ShortcutError
from shortcut_lightning.reporting.stage_report import write_stage_report

StartHook = Literal["fit_start", "epoch_start", "epoch_end"]
START_HOOKS: tuple[StartHook, ...] = ("fit_start", "epoch_start", "epoch_end")


class OnceStage(str, Enum):
    """The phases of a stage that acts once: before it acted, and after."""

    WAITING = "waiting"
    DONE = "done"


class Stage(Callback):
    """Base of every stage: declared members, ``start_epoch`` gating, phases, resumable state, reports.

    A subclass declares, on the class (checked when it is defined):

    - ``stage_label``: the name its tables carry (``"DFR"``);
    - ``report_file``: the JSON it writes beside the logs (``"dfr.json"``), or ``None``;
    - ``phases``: an ``Enum`` of ``str`` whose first member is where the stage begins, and ``transitions``,
      the ``(from, to)`` pairs of phases it may move between;
    - ``start_hooks``: where a due start may happen (``fit_start``, ``epoch_start``, ``epoch_end``: the end of
      the epoch before ``start_epoch``, so the start comes before that epoch's loader is built); ``()`` for a
      stage that starts itself;
    - ``uses_annotations`` and ``changes_model_at_fit_end`` (bool), class defaults that an instance sets for
      itself where its arguments decide (DFR's ``balance``, the s-score's ``prune_above``);
    - ``tested_file``: the checkpoint holding the model the test after ``fit`` tests when
      ``changes_model_at_fit_end``: ``"last"`` (the fit's last state) or the name the stage saves.

    It implements :meth:`start` (when ``start_hooks`` is not empty) and may extend :meth:`extra_state` /
    :meth:`load_extra_state` and :meth:`resume`. ``report`` (a dict, or an object with ``to_dict``) is kept
    in the state, so a resumed run keeps what the stage found.

    Example::

        class Announce(Stage):
            stage_label, report_file = "announce", "announce.json"
            start_hooks = ("epoch_start",)  # phases: OnceStage, WAITING -> DONE

            def start(self, trainer, pl_module):
                self.enter(OnceStage.DONE)
                self.write_report(trainer, {"epoch": trainer.current_epoch})

        trainer = L.Trainer(max_epochs=3, callbacks=[Announce(start_epoch=2)])
    """

    stage_label: ClassVar[str]
    report_file: ClassVar[str | None] = None
    phases: ClassVar[type[Enum]] = OnceStage
    transitions: ClassVar[tuple[tuple[Any, Any], ...]] = ((OnceStage.WAITING, OnceStage.DONE),)
    start_hooks: ClassVar[tuple[StartHook, ...]] = ()
    tested_file: ClassVar[str] = "last"
    uses_annotations: bool = False
    changes_model_at_fit_end: bool = False
    abstract: ClassVar[bool] = True  # a base of stages (not itself one): exempt from the checks below

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("abstract", False):
            return
        cls.abstract = False
        where = f"stage {cls.__name__}"
        if not isinstance(getattr(cls, "stage_label", None), str):
            raise TypeError(f"{where} must declare stage_label: str")
        if not (cls.report_file is None or cls.report_file.endswith(".json")):
            raise TypeError(f"{where}: report_file must name a .json file or be None")
        if not (
            isinstance(cls.phases, type) and issubclass(cls.phases, Enum) and issubclass(cls.phases, str)
        ):
            raise TypeError(f"{where}: phases must be an Enum of str")
        members = set(cls.phases.__members__.values())
        if any(len(pair) != 2 or not set(pair) <= members for pair in cls.transitions):
            raise TypeError(
                f"{where}: transitions must be (from, to) pairs of phases of {cls.phases.__name__}"
            )
        if any(hook not in START_HOOKS for hook in cls.start_hooks):
            raise TypeError(f"{where}: start_hooks must be among {', '.join(START_HOOKS)}")
        if cls.start_hooks and cls.start is Stage.start:
            raise TypeError(f"{where} has start_hooks but no start()")
        for name in ("uses_annotations", "changes_model_at_fit_end"):
            if not isinstance(cls.__dict__.get(name, getattr(cls, name)), bool):
                raise TypeError(f"{where}: {name} must be a bool on the class (an instance may set its own)")

    def __init__(self, start_epoch: int = 0) -> None:
        if start_epoch < 0:
            raise ShortcutError(f"{type(self).__name__} start_epoch must be >= 0, got {start_epoch}")
        self.start_epoch = start_epoch
        self.phase: Enum = self.initial_phase()
        self.report: Any = None

    # -- phases ---------------------------------------------------------------------------------
    @classmethod
    def initial_phase(cls) -> Enum:
        """The phase a stage begins in: the first of its ``phases``."""
        return next(iter(cls.phases))

    @property
    def waiting(self) -> bool:
        """Whether the stage has not started yet."""
        return self.phase == self.initial_phase()

    def enter(self, phase: Enum) -> None:
        """Moves to ``phase``; a transition the stage did not declare is a programming error."""
        if phase not in self.phases.__members__.values():
            raise RuntimeError(
                f"{type(self).__name__} cannot go to {phase!r}: not one of its {self.phases.__name__}"
            )
        if phase != self.phase and (self.phase, phase) not in self.transitions:
            raise RuntimeError(f"{type(self).__name__} cannot go from {self.phase.value} to {phase.value}")
        self.phase = phase

    # -- start_epoch gating ---------------------------------------------------------------------
    def start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The stage's first act, once ``start_epoch`` is due (where ``start_hooks`` allow)."""
        raise NotImplementedError

    def resume(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """At ``on_fit_start`` of a run restored past the initial phase: rebuild what the state does not hold."""

    def due(self, trainer: L.Trainer, hook: StartHook) -> bool:
        """Whether a start at ``hook`` is due: the stage waits, may start there and ``start_epoch`` has come."""
        if not self.waiting or hook not in self.start_hooks:
            return False
        epoch = trainer.current_epoch + (1 if hook == "epoch_end" else 0)
        return epoch >= self.start_epoch

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.waiting:
            self.resume(trainer, pl_module)
        elif self.due(trainer, "fit_start"):
            self.start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.due(trainer, "epoch_start"):
            self.start(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.due(trainer, "epoch_end"):
            self.start(trainer, pl_module)

    # -- what a runner reads --------------------------------------------------------------------
    @property
    def before_reports(self) -> dict[str, dict[str, Any]]:
        """Group reports per split of the model before the stage changed it (empty until it ran)."""
        return {}

    def tested_checkpoint(self, folder: Path, best: str | Path | None) -> Path | None:
        """The checkpoint in ``folder`` holding the model the test after ``fit`` tests: the stage's own
        (``tested_file``) when it changes the model at the end of ``fit``, else ``best`` (the checkpoint
        callback's best), else ``last.ckpt``; ``None`` when none of them exists."""
        return tested_checkpoint([self], folder, best)

    # -- the one way to write ------------------------------------------------------------------
    @staticmethod
    def log_dir(trainer: L.Trainer) -> Path:
        """The run's log directory (a collective under DDP: every rank must ask)."""
        return Path(trainer.log_dir or trainer.default_root_dir)

    def write_report(
        self,
        trainer: L.Trainer,
        report: Mapping[str, Any],
        summary: Iterable[str] = (),
        tables: Mapping[str, Mapping[str, dict[str, Any]]] | None = None,
        log_dir: Path | None = None,
    ) -> None:
        """Writes ``report`` as ``report_file`` beside the logs (rank 0) and logs ``summary`` and ``tables``.

        Called on every rank (the log directory is a collective), or on rank 0 alone with ``log_dir`` given.
        """
        if self.report_file is None:
            raise RuntimeError(f"{type(self).__name__} declares no report_file")
        folder = self.log_dir(trainer) if log_dir is None else log_dir
        write_stage_report(folder, self.report_file, report, list(summary), tables)

    def save_checkpoint(self, trainer: L.Trainer, name: str) -> Path:
        """``<name>.ckpt`` of the model as it is now, beside the checkpoint callback's (``<log_dir>/checkpoints``
        without one, or where it names no folder); every rank calls it (a collective)."""
        callback = trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None)
        path = (Path(folder) if folder else self.log_dir(trainer) / "checkpoints") / f"{name}.ckpt"
        trainer.save_checkpoint(path, weights_only=False)
        return path

    # -- resumable state ------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """What the stage keeps beside its phase and report."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Puts :meth:`extra_state` back."""

    def report_state(self) -> Any:
        """The report as the state stores it (its ``to_dict()`` where it has one)."""
        to_dict = getattr(self.report, "to_dict", None)
        return to_dict() if callable(to_dict) else self.report

    def load_report(self, saved: Any) -> None:
        """Puts :meth:`report_state` back (a stage whose report is a dataclass rebuilds it here)."""
        self.report = saved

    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase.value, "report": self.report_state(), **self.extra_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.phase = self.phases(state_dict.get("phase", self.initial_phase().value))
        self.load_report(state_dict.get("report"))
        self.load_extra_state(state_dict)


def tested_checkpoint(stages: Iterable[Any], folder: Path, best: str | Path | None) -> Path | None:
    """The checkpoint in ``folder`` holding the model the test after ``fit`` tests (the CLI tests the model
    in memory when a stage changed it at the end of ``fit``, else the best checkpoint; ``bench/`` reads the
    file): a changing stage's ``tested_file``, else ``best``, else ``last.ckpt``; ``None`` if none exists."""
    for stage in stages:
        if isinstance(stage, Stage) and stage.changes_model_at_fit_end:
            for name in (stage.tested_file, "last"):
                if (folder / f"{name}.ckpt").is_file():
                    return folder / f"{name}.ckpt"
            return None
    candidates = ([folder / Path(best).name] if best else []) + [folder / "last.ckpt"]
    return next((path for path in candidates if path.is_file()), None)


class ModelStage(Stage):
    """Runs :meth:`run` once on a trained model: at the end of ``fit``, or before ``validate``/``test``.

    Before an evaluation it runs again whenever weights were just loaded from a checkpoint
    (``trainer.ckpt_path``); on the in-memory model it runs once, so the test pass right after ``fit``
    evaluates the model the stage already changed instead of changing it twice. With ``saves`` set, the
    model the stage changed at the end of ``fit`` is saved as ``checkpoints/<saves>.ckpt`` (the stage's
    ``tested_file``). ``report`` (what :meth:`run` reported) is the resumable state: a resumed run keeps
    its "before" reports.
    """

    abstract = True
    saves: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        if cls.__dict__.get("saves"):  # the model it saves is the model the test after fit tests
            cls.tested_file = cls.saves
        super().__init_subclass__(**kwargs)

    def __init__(self) -> None:
        super().__init__(start_epoch=0)
        self._ran_in_memory = False
        self.report: dict[str, Any] = {}

    @property
    def result(self) -> dict[str, Any]:
        """What the last :meth:`run` reported (empty before it ran)."""
        return self.report

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        raise NotImplementedError

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        self.report = self.run(trainer, pl_module)
        self._ran_in_memory = True
        self.enter(OnceStage.DONE)
        return self.report

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A model stage starts itself at the end of ``fit``: nothing to resume before it."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run(trainer, pl_module)
        if self.saves is not None and self.changes_model_at_fit_end:
            self.save_checkpoint(trainer, self.saves)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._before_evaluation(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._before_evaluation(trainer, pl_module)

    def _before_evaluation(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is not None or not self._ran_in_memory:
            self._run(trainer, pl_module)

    def load_report(self, saved: Any) -> None:
        self.report = saved or {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "result" in state_dict and "report" not in state_dict:  # a checkpoint of before the Stage base
            state_dict = {
                "phase": OnceStage.DONE.value if state_dict["result"] else "waiting",
                "report": state_dict["result"],
            }
        super().load_state_dict(state_dict)


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
