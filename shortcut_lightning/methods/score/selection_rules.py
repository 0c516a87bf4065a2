"""SCORE's three ways of choosing a class's spurious-positive samples: ``manual``, ``oracle`` and ``auto``.

Each rule is a small class whose one method, ``select``, the mining calls once per class with the samples it
analysed (:class:`ClassCandidates`); it answers which of them are the class's spurious positives, best
first (:class:`Selection`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from shortcut_lightning.errors import ShortcutError
from shortcut_lightning.methods.score.lrp_analysis import LRPProbe, SampleAnalysis, top_by_logit
from shortcut_lightning.methods.score.spurious_positives import confuser_similarity
from shortcut_lightning.probing.embedding_pass import Embeddings

SELECTIONS = ("auto", "oracle", "manual")


@dataclass
class ClassCandidates:
    """What a rule may look at for class ``c``: the analysed samples' dataset indices ``pool`` (the top ones by
    the class logit, then manual picks outside them) and their analysis ``found`` (row ``k`` is ``pool[k]``);
    the round's ``probe`` and ranked ``train`` split, for a rule that analyses more samples; ``tag`` marks the
    progress lines of a run that reads annotations."""

    c: int
    pool: list[int]
    found: SampleAnalysis
    probe: LRPProbe
    train: Embeddings
    tag: str = ""


@dataclass
class Selection:
    """A rule's answer: positions in the pool of the selected samples, best first; the score it ranked every
    analysed sample by (``None`` for ``manual``); the confusers' analysis (``auto`` only)."""

    chosen: list[int]
    scores: Tensor | None = None
    confusers: SampleAnalysis | None = None


class SelectionRule(Protocol):
    """Chooses a class's spurious positives among its analysed samples."""

    def select(self, candidates: ClassCandidates) -> Selection: ...


def _eligible(found: SampleAnalysis, top_m: int, require_masked_prediction: bool) -> Tensor:
    """Which analysed samples a ranking rule may select: among the top ``top_m``, and with
    ``require_masked_prediction`` only those still predicted their class from the masked image alone."""
    eligible = found.kept.clone() if require_masked_prediction else torch.ones_like(found.kept)
    eligible[min(top_m, len(found)) :] = False
    return eligible


def _best(scores: Tensor, eligible: Tensor, n: int) -> list[int]:
    """The ``n`` eligible positions of the highest ``scores`` (ties in pool order)."""
    order = [int(i) for i in scores.argsort(descending=True, stable=True) if eligible[i]]
    return order[:n]


@dataclass(frozen=True)
class ManualSelection:
    """``manual``: the dataset indices a person picked per class from the review sheet (``{class: [indices]}``)."""

    indices: dict[int, list[int]]

    def select(self, candidates: ClassCandidates) -> Selection:
        return Selection([candidates.pool.index(i) for i in self.indices.get(candidates.c, [])])


@dataclass(frozen=True)
class OracleSelection:
    """``oracle``: the samples whose relevance mask overlaps the true spurious region most, at least
    ``min_overlap``. It reads the spurious annotations, so it is a reference, not the method."""

    top_m: int
    num_selected: int
    require_masked_prediction: bool
    min_overlap: float

    def select(self, candidates: ClassCandidates) -> Selection:
        scores = candidates.found.overlap
        if scores is None:
            raise ShortcutError(
                "selection='oracle' needs spurious-region masks, and the analysed samples have none"
            )
        eligible = _eligible(candidates.found, self.top_m, self.require_masked_prediction)
        eligible &= scores >= self.min_overlap
        return Selection(_best(scores, eligible, self.num_selected), scores)


@dataclass(frozen=True)
class AutoSelection:
    """``auto``, needing no annotations: the samples whose masked-region embedding is most similar (cosine, to
    the mean direction) to that of the class's *confusers*, the ``n_confusers`` samples of other classes with
    the highest logit of the class. Their evidence for the class cannot be its object, which they lack."""

    top_m: int
    num_selected: int
    require_masked_prediction: bool
    n_confusers: int

    def select(self, candidates: ClassCandidates) -> Selection:
        c = candidates.c
        eligible = _eligible(candidates.found, self.top_m, self.require_masked_prediction)
        confusers = top_by_logit(candidates.train, c, own=False, n=self.n_confusers)
        other = candidates.probe.analyse(confusers, c, f"{c} confusers{candidates.tag}")
        scores = confuser_similarity(candidates.found.embedding, other.embedding)
        return Selection(_best(scores, eligible, self.num_selected), scores, other)


def selection_rule(
    selection: str,
    top_m: int,
    num_selected: int,
    require_masked_prediction: bool,
    manual_indices: dict[int, list[int]],
    oracle_min_overlap: float,
    n_confusers: int,
) -> SelectionRule:
    """The rule named ``selection`` (one of :data:`SELECTIONS`), from the mining's arguments of the same names."""
    if selection == "manual":
        return ManualSelection(manual_indices)
    if selection == "oracle":
        return OracleSelection(top_m, num_selected, require_masked_prediction, oracle_min_overlap)
    if selection == "auto":
        return AutoSelection(top_m, num_selected, require_masked_prediction, n_confusers)
    raise ShortcutError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")


def check_manual_indices(manual_indices: dict[int, list[int]], dataset: Any, classes: list[int]) -> None:
    """Refuses picks of a class that is not mined, of a sample the split lacks, or of another class's sample."""
    for c, indices in manual_indices.items():
        if c not in classes:
            raise ShortcutError(f"manual_indices names class {c}, which is not mined (classes {classes})")
        for i in indices:
            if not 0 <= i < len(dataset):
                raise ShortcutError(
                    f"manual_indices[{c}] lists sample {i}, but the train split has samples "
                    f"0..{len(dataset) - 1}"
                )
            if int(dataset.targets[i]) != c:
                raise ShortcutError(
                    f"manual_indices[{c}] lists sample {i}, which belongs to class {int(dataset.targets[i])}; "
                    "list each sample under its own class (see the indices on review_<class>.png)"
                )
