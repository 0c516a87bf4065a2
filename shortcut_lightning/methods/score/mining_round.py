"""One round of SCORE's mining, decided on rank 0: per class the LRP look, the selection, the neurons.

:meth:`RoundMiner.mine` returns the round's decision, typed (:class:`RoundFindings`). The mining broadcasts it
to every rank; the review sheets and embedding panels stay on the rank that drew them (they are not pickled),
which is the one that writes them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from shortcut_lightning.errors import ShortcutError
from shortcut_lightning.methods.score.lrp_analysis import LRPProbe, SampleAnalysis, top_by_logit
from shortcut_lightning.methods.score.mining_figures import review_sheet, selection_panel
from shortcut_lightning.methods.score.mining_result import ClassReport, SpuriousPairs
from shortcut_lightning.methods.score.selection_rules import ClassCandidates, Selection, SelectionRule
from shortcut_lightning.methods.score.spurious_positives import neuron_scores, select_neurons
from shortcut_lightning.probing.embedding_pass import Embeddings


@dataclass
class ClassFindings:
    """One class's part of a round: its ``mining.json`` entry, the relevance ``masks`` [k,1,H,W] of its selected
    samples and, on the rank that drew them, its review ``sheet`` and embedding ``panel``."""

    report: ClassReport
    masks: Tensor
    sheet: Any = None
    panel: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """The figures stay behind: a broadcast to the other ranks carries the decision only."""
        return {**self.__dict__, "sheet": None, "panel": None}


@dataclass
class RoundFindings:
    """A round's decision: per class name its :class:`ClassFindings`, in the order the classes were mined."""

    classes: dict[str, ClassFindings]
    fill: float

    @property
    def neurons(self) -> list[int]:
        """The union of the classes' neurons, sorted."""
        return sorted({n for found in self.classes.values() for n in found.report.neurons})

    @property
    def reports(self) -> dict[str, ClassReport]:
        return {name: found.report for name, found in self.classes.items()}

    @property
    def pairs(self) -> SpuriousPairs:
        """Every class's selected samples and their masks, class after class."""
        indices = [i for found in self.classes.values() for i in found.report.selected_indices]
        masks = torch.cat([found.masks for found in self.classes.values()])
        return SpuriousPairs(indices, masks, self.fill)

    @property
    def sheets(self) -> dict[str, Any]:
        return {name: found.sheet for name, found in self.classes.items()}

    @property
    def panels(self) -> dict[str, dict[str, np.ndarray]]:
        return {name: found.panel for name, found in self.classes.items() if found.panel is not None}


@dataclass(frozen=True)
class RoundMiner:
    """How each class is mined (``SpuriousPositiveMining``'s arguments of the same names; ``rule`` is its
    ``selection``, ``tag`` marks every line of a run that reads annotations)."""

    rule: SelectionRule
    selection: str
    top_m: int
    manual_indices: dict[int, list[int]]
    oracle_min_overlap: float
    neuron_samples: str
    num_neurons: int | None
    z_score: float | None
    neuron_share: float | None
    top_q: float
    fill: float
    tag: str = ""

    def mine(self, probe: LRPProbe, train: Embeddings, classes: dict[int, str]) -> RoundFindings:
        """The round on the model ``probe`` looks at, for ``classes`` (``{class: name}``) ranked in ``train``.

        Raises a :class:`ShortcutError` when no class gives a neuron: there would be nothing to regularise.
        """
        found = RoundFindings(
            {name: self.mine_class(probe, train, c, name) for c, name in classes.items()}, self.fill
        )
        if not found.neurons:
            raise ShortcutError(
                f"SCORE mining{self.tag}: no sample passed the {self.selection!r} selection in any class, so there "
                "is nothing to regularise. Look at review_<class>.png, then try selection='manual', a larger "
                "top_m or top_q, or require_masked_prediction=False"
            )
        return found

    def mine_class(self, probe: LRPProbe, train: Embeddings, c: int, name: str) -> ClassFindings:
        """Class ``c``: its top samples by logit (and manual picks) analysed, selected, their neurons scored."""
        top = top_by_logit(train, c, own=True, n=self.top_m)
        pool = top + [i for i in self.manual_indices.get(c, []) if i not in top]
        found = probe.analyse(pool, c, f"{name}{self.tag}")
        picked = self.rule.select(ClassCandidates(c, pool, found, probe, train, self.tag))
        chosen, scores = picked.chosen, picked.scores
        passing = [pool[i] for i in chosen]
        report = ClassReport(
            top_indices=top,
            selected_indices=passing,
            masked_prediction_kept=int(found.kept.sum()),
            selection_scores=None if scores is None else [round(float(s), 5) for s in scores],
            neurons=[],
        )
        if found.overlap is not None:
            report.lrp_mask_overlap_with_spurious_region = float(found.overlap[: len(top)].mean())
            if chosen:
                hits = found.overlap[chosen] >= self.oracle_min_overlap
                report.precision_vs_oracle = float(hits.float().mean())
        if chosen:
            report.neurons, report.neuron_scores, report.layer_scores = self._neurons(found, picked)
        else:
            warnings.warn(
                f"SCORE mining{self.tag}: no spurious-positive sample of class {name!r} passed the selection "
                f"({self.selection}); no neuron is taken from this class",
                stacklevel=2,
            )
        notes = None if scores is None else [f"{float(v):.2f}" for v in scores]
        title = (
            f"class {name}: top {len(top)} by logit, each beside its masked image (LRP top {self.top_q:.0%}); "
            f"framed = selected ({self.selection}){self.tag}"
        )
        sheet = review_sheet(found.images, found.masks, pool, passing, title, notes, fill=self.fill)
        panel = selection_panel(found, chosen, self.oracle_min_overlap)
        return ClassFindings(report, found.masks[chosen], sheet, panel)

    def _neurons(
        self, found: SampleAnalysis, picked: Selection
    ) -> tuple[list[int], list[float], list[float]]:
        """The selected samples' best neurons, their scores and every channel's (of the confusers with
        ``neuron_samples`` ``confusers``, where the rule analysed them)."""
        activation, relevance = found.activation[picked.chosen], found.relevance[picked.chosen]
        if self.neuron_samples == "confusers" and picked.confusers is not None:
            activation, relevance = picked.confusers.activation, picked.confusers.relevance
        scores = neuron_scores(activation, relevance)
        best = select_neurons(scores, self.num_neurons, self.z_score, self.neuron_share)
        return best.tolist(), [round(float(scores[j]), 6) for j in best], [round(float(v), 6) for v in scores]
