"""``LastLayerRefit``: the body every last-layer method shares (DFR, AFR): embed, fit a head on rank 0, write it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from shortcut_lightning.data.base import require_group_datamodule
from shortcut_lightning.errors import DataError, ModelError
from shortcut_lightning.methods.dfr.last_layer import LinearHead
from shortcut_lightning.probing.embedding_pass import Embeddings, embed_splits, head_change_reports
from shortcut_lightning.probing.model_parts import find_head
from shortcut_lightning.reporting.stage_report import stage_tables
from shortcut_lightning.stages import ModelStage, decide_on_rank_zero


class LastLayerRefit(ModelStage):
    """Embeds ``split`` (and ``report_splits``) with evaluation transforms, fits a new head on rank 0 (broadcast,
    errors included), writes it into the model's head and reports group accuracy before and after.

    Under DDP the features reach rank 0 alone; rank 0 checks the refit split, fits and computes the group
    reports, and broadcasts the head and the reports (an error included) to every rank.

    Subclasses implement :meth:`fit_head` (the method) and :meth:`details` (its JSON fields), and declare
    ``name``, which names their files: ``dfr`` -> ``report_file`` ``dfr.json``, ``dfr_head.pt``,
    ``checkpoints/dfr.ckpt`` (``saves``), scalars ``dfr/...``.
    """

    abstract = True
    name: ClassVar[str]
    changes_model_at_fit_end = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        if "name" in cls.__dict__:  # the files follow the name
            cls.report_file, cls.saves = f"{cls.name}.json", cls.name
        super().__init_subclass__(**kwargs)

    def __init__(
        self, split: str, report_splits: Sequence[str], head: str | None, extra_splits: Sequence[str] = ()
    ):
        super().__init__()
        self.split = split
        self.head_path = head
        self.report_splits = tuple(report_splits)
        self.extra_splits = tuple(extra_splits)

    @property
    def before_reports(self) -> dict[str, dict[str, Any]]:
        return self.report.get("before", {})

    # -- what a method provides -----------------------------------------------------------------
    def fit_head(self, dm: Any, embeddings: dict[str, Embeddings], head: torch.nn.Linear) -> LinearHead:
        """The new head from the embeddings of :attr:`split` (and of ``extra_splits``); runs on rank 0 only."""
        raise NotImplementedError

    def details(self, fitted: LinearHead) -> dict[str, Any]:
        """The method's fields of the report (before the group reports)."""
        raise NotImplementedError

    def scalars(self, fitted: LinearHead) -> dict[str, float]:
        """The method's scalars for the loggers (beside the before/after accuracies)."""
        return {}

    # -- the shared body ------------------------------------------------------------------------
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Refit the head of ``pl_module`` in place; returns (and keeps) the report."""
        dm = require_group_datamodule(getattr(trainer, "datamodule", None), type(self).__name__)
        head = find_head(pl_module, self.head_path)
        if head.out_features != dm.num_classes:
            raise ModelError(
                f"the head found ({head}) has {head.out_features} outputs but the data has {dm.num_classes} "
                f"classes: name the right layer with {type(self).__name__}(head=...)"
            )
        splits = [self.split, *(s for s in self.report_splits if s != self.split)]
        splits += [s for s in self.extra_splits if s and s not in splits]
        # the features are the input of rank 0's decision alone: no other rank holds a copy
        embeddings = embed_splits(
            pl_module, dm, head, splits, f"{self.stage_label}: embedding", features="rank_zero"
        )
        if self.split not in embeddings:
            raise DataError(
                f"{self.stage_label} refit split {self.split!r} is not in the data; it has {', '.join(dm.splits)}"
            )
        fitted, reports = decide_on_rank_zero(trainer, lambda: self._decide(dm, embeddings, head))
        with torch.no_grad():
            head.weight.copy_(torch.as_tensor(fitted.weight, dtype=head.weight.dtype))
            if head.bias is not None:
                head.bias.copy_(torch.as_tensor(fitted.bias, dtype=head.bias.dtype))
        report = {**self.details(fitted), **reports}
        tables = stage_tables({"before": report["before"], self.stage_label: report["after"]})
        self.write_report(trainer, report, tables=tables)  # every rank asks the log directory
        self._write_head(trainer, self.log_dir(trainer), report, fitted)
        return report

    def _decide(
        self, dm: Any, embeddings: dict[str, Embeddings], head: torch.nn.Linear
    ) -> tuple[LinearHead, dict[str, Any]]:
        """Rank 0: the refit split checked, the new head and the group reports before and after it."""
        self.check_refit_split(dm, embeddings[self.split])
        fitted = self.fit_head(dm, embeddings, head)
        weight, bias = torch.as_tensor(fitted.weight), torch.as_tensor(fitted.bias)
        if weight.shape != head.weight.shape:  # copy_ would broadcast one row into every class's
            raise ModelError(
                f"{self.stage_label} fit a head of shape {tuple(weight.shape)} for a head of shape "
                f"{tuple(head.weight.shape)}: refit on a split with every class"
            )
        reported = {s: e for s, e in embeddings.items() if s in self.report_splits}
        return fitted, head_change_reports(dm, reported, weight, bias)

    def check_refit_split(self, dm: Any, refit: Embeddings) -> None:
        """A refit needs samples of every class the head has: a split without one fits no row for it."""
        names = list(dm.class_names)
        present = sorted(int(c) for c in refit.target.unique())
        where = f"{self.stage_label} refit split {self.split!r}"
        unknown = [c for c in present if not 0 <= c < len(names)]
        if unknown:
            raise DataError(
                f"{where} has class label {unknown[0]} but the head has {len(names)} classes (0..{len(names) - 1}): "
                "check the data's class column"
            )
        if len(present) < 2:
            raise DataError(
                f"{where} holds one class ({names[present[0]] if present else 'none'!r}): a refit needs samples "
                f"of every class the head has ({', '.join(names)}); refit on another split"
            )
        missing = [names[c] for c in range(len(names)) if c not in present]
        if missing:
            raise DataError(
                f"{where} has no sample of class {missing[0]!r} (the head has {len(names)} classes: "
                f"{', '.join(names)}), so the refit could not score it: refit on a split with every class"
            )

    @rank_zero_only
    def _write_head(
        self, trainer: L.Trainer, log_dir: Path, report: dict[str, Any], fitted: LinearHead
    ) -> None:
        """``<name>_head.pt`` (the refit head over raw embeddings) and the before/after scalars for the loggers."""
        torch.save(
            {"weight": torch.as_tensor(fitted.weight), "bias": torch.as_tensor(fitted.bias)},
            log_dir / f"{self.name}_head.pt",
        )
        scalars = {f"{self.name}/{k}": v for k, v in self.scalars(fitted).items()}
        for key in ("before", "after"):
            for split, r in report[key].items():
                for name in ("wga", "mean", "weighted_mean"):
                    if r[name] is not None:
                        scalars[f"{self.name}/{split}/{name}_{key}"] = r[name]
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
