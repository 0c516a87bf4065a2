"""PruSC's best validated states: keep a copy of part of the model whenever a candidate scores best, put it back once.

One tracker, :class:`KeepBest`, with two behaviours: :class:`BestMasks` keeps the mask logits of the best
mask-learning epoch (``MaskPruning(monitor=...)``; with ``batchnorm="batch"`` also the BatchNorm statistics they
were validated with), :class:`BestWeights` the whole model state of the best candidate once the masks are fixed
(``finetune_keep="best"``). Without a monitor a tracker keeps nothing.

A kept copy is never held twice, in memory or in a checkpoint. While the kept candidate IS the model's current
state, the tracker holds the marker :data:`IN_MODEL` instead of a copy, and copies the tensors only when the model
is about to change (:meth:`KeepBest.materialise`, which the stage calls before every training step and before it
changes the masks). In the state a checkpoint stores, every kept tensor that is bit for bit the model's own (which
the checkpoint's ``state_dict`` holds) is the marker too; a resumed run reads those back from the model as loaded
(Lightning loads the model's weights before the callbacks' state, and the model is as saved until its first
training step). A kept tensor whose elements are all one value (the dense model's mask logits, all
``init_logit``) is stored as that value and its shape. The copy is dropped once put back, so later checkpoints do
not carry it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from shortcut_lightning.errors import ShortcutError
from shortcut_lightning.methods.prusc.masks import model_masks
from shortcut_lightning.metrics import SUMMARY_KEYS
from shortcut_lightning.reporting.rank_zero_log import rank_zero_log

log = logging.getLogger(__name__)

IN_MODEL = "in the model"  # the marker: this tensor (or the whole copy) is the model's current one
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm's buffers

Kept = dict[str, Any] | str | None  # a copy by name (tensors, constants or markers), the marker, or nothing
Read = Callable[[], Mapping[str, Tensor]]  # the model's live tensors of one kept part, by name
Write = Callable[[Mapping[str, Tensor], bool], None]  # puts copies back (the bool: they are the whole part)


class KeepBest:
    """Keeps ``parts`` of the model whenever a candidate's ``monitor`` value beats the best so far (``mode``).

    ``best`` (``{key: candidate, "score": ..., part: copy, ...}``, ``None`` before a candidate) is resumable
    state: :meth:`state` is what a checkpoint stores, :meth:`load` reads it back. :meth:`bind` names the model
    whose tensors are kept. A subclass declares ``key`` (what names a candidate), ``parts`` and how to read and
    write each part of a model.
    """

    key: ClassVar[str]
    parts: ClassVar[tuple[str, ...]]
    unvalidated: ClassVar[str]  # said at the end when the monitor was never validated

    def __init__(self, monitor: str | None, mode: str = "max") -> None:
        self.monitor = monitor
        self.mode = mode
        self.best: dict[str, Any] | None = None
        self._sources: dict[str, tuple[Read, Write] | None] = {}

    # -- what a behaviour declares -------------------------------------------------------------
    def sources(self, model: nn.Module) -> dict[str, tuple[Read, Write] | None]:
        """How each part is read from and written to ``model`` (``None``: a part this tracker does not keep)."""
        raise NotImplementedError

    def candidate(self, epoch: int) -> Any:
        """The name of the candidate validated in ``epoch``."""
        raise NotImplementedError

    def describe(self, candidate: Any) -> str:
        """The candidate as the log names it."""
        raise NotImplementedError

    # -- candidates ----------------------------------------------------------------------------
    def bind(self, model: nn.Module) -> None:
        """Keeps ``model``'s tensors from now on (the stage binds it once its masks are attached)."""
        self._sources = self.sources(model)

    def consider(self, candidate: Any, score: float | None) -> None:
        """Keeps the model's parts if ``score`` beats the best so far, as the model's own until :meth:`materialise`;
        ``None`` (a report without ``monitor``) is no candidate."""
        if self.monitor is None or score is None or not beats(score, self.best, self.mode):
            return
        kept = {part: None if self._sources.get(part) is None else IN_MODEL for part in self.parts}
        self.best = {self.key: candidate, "score": score, **kept}

    def validated(self, trainer: L.Trainer) -> None:
        """After a validation: the model as validated in this epoch is a candidate."""
        if self.monitor is not None:
            self.consider(self.candidate(trainer.current_epoch), logged_score(trainer, self.monitor))

    def consider_report(self, candidate: Any, reports: dict[str, dict[str, Any]]) -> float | None:
        """A candidate scored in group reports by split (``val/worst_class``: ``reports["val"]["worst_class"]``);
        returns its score, ``None`` where the reports lack ``monitor``."""
        score = None if self.monitor is None else report_score(reports, self.monitor)
        self.consider(candidate, score)
        return score

    def materialise(self) -> None:
        """Copies what is kept as the model's own (after a resume: what the checkpoint had as the model's), before
        the model changes."""
        if self.best is not None:
            for part, source in self._sources.items():
                if source is not None:
                    self.best[part] = materialised(self.best[part], source[0])

    def restore(self) -> dict[str, Any] | None:
        """Puts the best candidate's parts back once; returns ``{"monitor", key, "score"}``, ``None`` if none was seen."""
        if self.best is None:
            if self.monitor is not None:
                rank_zero_log(log, f"PruSC: {self.monitor} was never validated {self.unvalidated}")
            return None
        if any(self.best[part] is not None for part in self.parts):  # not yet put back
            for part in self.parts:
                kept, source = self.best[part], self._sources.get(part)
                # a marker is the model's own tensor (it is copied before the model changes): nothing to put back
                if source is not None and isinstance(kept, dict):
                    copies = {k: v for k, v in kept.items() if not is_marker(v)}
                    source[1](copies, len(copies) == len(kept))
                self.best[part] = None
            score = f"{self.monitor} {self.best['score']:.4f}"
            rank_zero_log(log, f"PruSC: {self.describe(self.best[self.key])} is kept ({score})")
        return {"monitor": self.monitor, self.key: self.best[self.key], "score": self.best["score"]}

    # -- resumable state -----------------------------------------------------------------------
    def state(self) -> dict[str, Any] | None:
        """``best`` as a checkpoint stores it: no tensor that the model's state already holds (unbound: as is)."""
        if self.best is None or not self._sources:
            return self.best
        stored = {}
        for part in self.parts:
            source = self._sources.get(part)
            stored[part] = for_checkpoint(self.best[part], {} if source is None else source[0]())
        return {**self.best, **stored}

    def load(self, saved: dict[str, Any] | None) -> None:
        """``best`` from a checkpoint's :meth:`state` (its markers are read from the model before it changes)."""
        if self.monitor is None or saved is None:
            self.best = None
            return
        self.best = {**saved, **{part: from_checkpoint(saved.get(part)) for part in self.parts}}


class BestMasks(KeepBest):
    """The mask logits of the best mask-learning epoch (and, with ``statistics``, the BatchNorm statistics: with
    ``batchnorm="batch"`` they move while the masks learn, and the best masks need theirs). A candidate is an
    epoch; ``None`` is the dense model, before any mask epoch (``keep_dense``)."""

    key, parts = "epoch", ("logits", "statistics")
    unvalidated = "during mask learning; the last masks are kept"

    def __init__(self, monitor: str | None, mode: str = "max", statistics: bool = False) -> None:
        super().__init__(monitor, mode)
        self.statistics = statistics

    def sources(self, model: nn.Module) -> dict[str, tuple[Read, Write] | None]:
        def write_logits(copies: Mapping[str, Tensor], whole: bool) -> None:
            with torch.no_grad():
                for name, mask in model_masks(model).items():
                    if name in copies:
                        mask.logits.copy_(copies[name])

        logits = (lambda: {name: m.logits for name, m in model_masks(model).items()}, write_logits)
        return {"logits": logits, "statistics": _state_of(model, STATISTICS) if self.statistics else None}

    def consider_dense(self, before: dict[str, dict[str, Any]]) -> None:
        """``keep_dense``: the model before the stage, scored in its group reports by split, is a candidate; warns
        where they lack ``monitor``."""
        if self.monitor is not None and self.consider_report(None, before) is None:
            rank_zero_warn(
                f"PruSC keep_dense: {self.monitor} is not a summary of the before report (report_splits with "
                f"{self.monitor.partition('/')[0]!r}, a key of {', '.join(SUMMARY_KEYS)}); only mask epochs "
                "are candidates"
            )

    def candidate(self, epoch: int) -> int:
        return epoch

    def describe(self, candidate: int | None) -> str:
        return "the dense model" if candidate is None else f"the masks of epoch {candidate}"


class BestWeights(KeepBest):
    """The model's whole state (weights, mask logits, BatchNorm statistics) at the best candidate once the masks
    are fixed: the model before the stage (``keep_dense``), the masks fixed before the fine-tuning, and every
    fine-tuning epoch. Put back at the end, so a fine-tuning that drifts cannot end below what was validated
    before it. A candidate is named by when it was (``"after fine-tuning epoch 3"``)."""

    key, parts = "when", ("state",)
    unvalidated = "after the masks were fixed; the last model is kept"

    def sources(self, model: nn.Module) -> dict[str, tuple[Read, Write] | None]:
        return {"state": _state_of(model)}

    def candidate(self, epoch: int) -> str:
        return f"after fine-tuning epoch {epoch}"

    def describe(self, candidate: str) -> str:
        return f"the model {candidate}"


def _state_of(model: nn.Module, suffixes: tuple[str, ...] | None = None) -> tuple[Read, Write]:
    """Reads ``model``'s state entries (those ending in ``suffixes``; ``None``: all) and loads copies back
    (strictly when they are the whole state)."""

    def read() -> Mapping[str, Tensor]:
        state = model.state_dict()
        return state if suffixes is None else {k: v for k, v in state.items() if k.endswith(suffixes)}

    def write(copies: Mapping[str, Tensor], whole: bool) -> None:
        with torch.no_grad():
            model.load_state_dict(copies, strict=whole and suffixes is None)

    return read, write


# -- scores ----------------------------------------------------------------------------------------
def logged_score(trainer: L.Trainer, monitor: str) -> float:
    """``monitor``'s value in the validation just ended; a metric that was not logged is named, with those that were."""
    value = trainer.callback_metrics.get(monitor)
    if value is None:
        found = ", ".join(sorted(k for k in trainer.callback_metrics if k.startswith("val/"))) or "none"
        raise ShortcutError(
            f"MaskPruning monitor {monitor!r} was not logged in validation (logged: {found}); "
            "set monitor to one of them, e.g. val/worst_class"
        )
    return float(value)


def report_score(reports: dict[str, dict[str, Any]], monitor: str) -> float | None:
    """``monitor``'s value in group reports by split (``val/worst_class``: ``reports["val"]["worst_class"]``)."""
    split, _, key = monitor.partition("/")
    value = reports.get(split, {}).get(key)
    return None if value is None else float(value)


def beats(score: float, best: dict[str, Any] | None, mode: str) -> bool:
    """Whether ``score`` is better than the best candidate so far (``{"score": ...}``; ``None``: none yet)."""
    if best is None:
        return True
    return score > best["score"] if mode == "max" else score < best["score"]


# -- kept copies: the marker, and constants stored as one value ------------------------------------
def is_marker(value: Any) -> bool:
    """Whether ``value`` is :data:`IN_MODEL` (and not a tensor, a dict or ``None``)."""
    return isinstance(value, str) and value == IN_MODEL


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same values bit for bit (dtype, shape, values and the sign of zeros)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    b = b.detach().to(a.device)
    if not torch.equal(a, b):  # NaN never equals itself: such a tensor is stored
        return False
    return not a.is_floating_point() or torch.equal(torch.signbit(a), torch.signbit(b))


def compact(tensor: Tensor) -> Tensor | dict[str, Any]:
    """``tensor``, or ``{"fill": value, "shape": [...]}`` where every element is that one value."""
    if tensor.numel() > 1:
        fill = tensor.detach().flatten()[0].clone()
        if same_bits(tensor, fill.expand(tensor.shape)):
            return {"fill": fill, "shape": list(tensor.shape)}
    return tensor


def materialised(kept: Kept, live: Read) -> Kept:
    """``kept`` with every marker replaced by a CPU copy of the model's tensor of that name (``live()``, asked for
    only where there is a marker: this runs before every training step)."""
    if is_marker(kept):
        return {k: v.detach().to("cpu", copy=True) for k, v in live().items()}
    if not isinstance(kept, dict) or not any(is_marker(v) for v in kept.values()):
        return kept
    tensors = live()
    return {k: tensors[k].detach().to("cpu", copy=True) if is_marker(v) else v for k, v in kept.items()}


def for_checkpoint(kept: Kept, live: Mapping[str, Tensor]) -> Kept:
    """``kept`` as a checkpoint stores it: each tensor that is bit for bit the model's (``live``) a marker, each
    other one :func:`compact`."""
    if not isinstance(kept, dict):
        return kept
    return {k: IN_MODEL if k in live and same_bits(v, live[k]) else compact(v) for k, v in kept.items()}


def from_checkpoint(kept: Kept) -> Kept:
    """``kept`` as :func:`for_checkpoint` stored it, with each constant a tensor again (a view of its one value)."""
    if not isinstance(kept, dict):
        return kept
    return {k: v["fill"].expand(v["shape"]) if isinstance(v, dict) else v for k, v in kept.items()}
