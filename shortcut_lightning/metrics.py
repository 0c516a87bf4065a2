"""Group accuracies as a torchmetrics ``Metric``: summed states, exact under DDP by construction."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

SUMMARY_KEYS = ("wga", "mean", "weighted_mean", "worst_class", "balanced")


class GroupAccuracy(Metric):
    """Per-group accuracy and the summaries the spurious-correlation literature reports.

    ``compute()`` returns ``group_acc`` and ``group_n`` (per group id; NaN accuracy for empty groups),
    ``class_acc``, and the scalars ``wga`` (worst group among groups with samples), ``mean`` (plain
    sample mean), ``weighted_mean`` (each group's accuracy weighted by its share of the training set,
    the Waterbirds convention; NaN without ``train_counts``), ``worst_class`` and ``balanced`` (mean of
    class accuracies). Group ``g`` belongs to class ``g // (num_groups // num_classes)``.

    Example::

        metric = GroupAccuracy(num_groups=4, num_classes=2, train_counts=torch.tensor([3498, 184, 56, 1057]))
        metric.update(torch.randn(8, 2), torch.randint(0, 2, (8,)), torch.randint(0, 4, (8,)))
        metric.compute()["wga"]
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(
        self, num_groups: int, num_classes: int, train_counts: Tensor | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if num_groups % num_classes:
            raise ValueError(f"num_groups ({num_groups}) must be a multiple of num_classes ({num_classes})")
        self.num_groups = num_groups
        self.num_classes = num_classes
        self.train_counts = (
            None if train_counts is None else torch.as_tensor(train_counts, dtype=torch.float64)
        )
        self.add_state("correct", torch.zeros(num_groups, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_groups, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, groups: Tensor) -> None:
        """``preds``: logits/scores [N, C] or predicted labels [N]."""
        if preds.ndim == 2:
            preds = preds.argmax(dim=1)
        hits = (preds == target).long()
        groups = groups.long()
        if groups.numel() and (groups.min() < 0 or groups.max() >= self.num_groups):
            raise ValueError(
                f"group ids must lie in [0, {self.num_groups}), got {groups.min()}..{groups.max()}"
            )
        # bincount of the hits' groups, not bincount with weights: that has no deterministic CUDA kernel and
        # raises under trainer.deterministic: true
        self.correct += torch.bincount(groups[hits.bool()], minlength=self.num_groups)
        self.total += torch.bincount(groups, minlength=self.num_groups)

    def compute(self) -> dict[str, Tensor]:
        correct, total = self.correct.double(), self.total.double()
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=correct.device)
        present = total > 0
        group_acc = torch.where(present, correct / total.clamp(min=1), nan)
        per_class = self.num_groups // self.num_classes
        class_correct = correct.view(self.num_classes, per_class).sum(1)
        class_total = total.view(self.num_classes, per_class).sum(1)
        class_present = class_total > 0
        class_acc = torch.where(class_present, class_correct / class_total.clamp(min=1), nan)
        weighted = nan
        if self.train_counts is not None:
            w = self.train_counts.to(correct.device) * present
            if w.sum() > 0:
                weighted = (w * group_acc.nan_to_num()).sum() / w.sum()
        return {
            "group_acc": group_acc,
            "group_n": self.total.clone(),
            "class_acc": class_acc,
            "wga": group_acc[present].min() if present.any() else nan,
            "mean": correct.sum() / total.sum() if total.sum() > 0 else nan,
            "weighted_mean": weighted,
            "worst_class": class_acc[class_present].min() if class_present.any() else nan,
            "balanced": class_acc[class_present].mean() if class_present.any() else nan,
        }


def _number(x: Tensor | float) -> float | None:
    value = float(x)
    return None if math.isnan(value) else value


def group_report(result: dict[str, Tensor], group_names: Sequence[str], split: str) -> dict[str, Any]:
    """The ``metrics.json`` contract: summaries plus ``groups: {name: {acc, n}}`` (acc null if empty)."""
    report: dict[str, Any] = {"split": split}
    report.update({k: _number(result[k]) for k in SUMMARY_KEYS})
    report["groups"] = {
        name: {"acc": _number(acc), "n": int(n)}
        for name, acc, n in zip(group_names, result["group_acc"], result["group_n"], strict=True)
    }
    return report


def format_group_table(columns: Mapping[str, dict[str, Any]]) -> str:
    """A plain-text table: a row per group and per summary, a column per report (e.g. before/after a stage)."""
    reports = list(columns.values())
    first = reports[0]
    width = max([len(n) for n in first["groups"]] + [13])
    heads = "  ".join(f"{label:>7}" for label in columns)
    lines = [f"{first['split']} accuracy by group", f"{'group':<{width}}  {heads}  {'n':>6}"]

    def cell(value: float | None) -> str:
        return f"{'-':>7}" if value is None else f"{value:7.3f}"

    for name, group in first["groups"].items():
        accs = "  ".join(cell(r["groups"][name]["acc"]) for r in reports)
        lines.append(f"{name:<{width}}  {accs}  {group['n']:>6}")
    lines.append("-" * (width + 9 * len(reports) + 8))
    for key in SUMMARY_KEYS:
        lines.append(f"{key:<{width}}  " + "  ".join(cell(r[key]) for r in reports))
    return "\n".join(lines)
