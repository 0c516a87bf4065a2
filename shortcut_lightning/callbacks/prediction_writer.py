"""``PredictionWriter``: ``predictions.csv`` with one row per sample of the predicted split, from every DDP rank."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from shortcut_lightning.errors import ShortcutError
from shortcut_lightning.reporting.rank_zero_log import rank_zero_log

log = logging.getLogger(__name__)

COLUMNS = ("index", "target", "group", "pred")


class PredictionWriter(Callback):
    """Collects what ``predict_step`` returns on each rank, gathers it on every rank, writes it once.

    Why: under DDP each rank predicts its own shard, and Lightning hands each rank only its own
    predictions (none at all under ``ddp_spawn``). The shards are gathered, rows repeated by a padding
    sampler are dropped by ``index``, and rank 0 writes the split in index order. ``predict_step`` must
    return a dict with ``index``, ``target``, ``group``, ``pred`` and ``logits`` (``ShortcutClassifier``'s
    does). The ``shortcut`` CLI always adds it (``predictions``).

    Example::

        trainer = L.Trainer(callbacks=[PredictionWriter()], default_root_dir="runs/predict")
        trainer.predict(ShortcutClassifier("resnet18"), datamodule=SyntheticShortcuts())  # runs/predict/predictions.csv

    Args:
        filename: the CSV's name in the run's log directory.
    """

    def __init__(self, filename: str = "predictions.csv") -> None:
        self.filename = filename
        self._rows: list[dict[str, Tensor]] = []

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        keys = (*COLUMNS, "logits")
        if not isinstance(outputs, dict) or any(k not in outputs for k in keys):
            raise ShortcutError(
                f"PredictionWriter needs predict_step to return a dict with {', '.join(keys)} "
                f"(ShortcutClassifier's does); got {type(outputs).__name__}"
            )
        self._rows.append({k: torch.as_tensor(outputs[k]).detach().cpu() for k in keys})

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        local = {k: torch.cat([r[k] for r in self._rows]) for k in self._rows[0]} if self._rows else None
        rows = gather_rows(trainer, pl_module, local)
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank asks
        if rows is None or not trainer.is_global_zero:
            return
        path = log_dir / self.filename
        write_predictions(rows, path)
        rank_zero_log(log, f"predictions written to {path} ({len(rows['index'])} rows)")


def gather_rows(
    trainer: L.Trainer, pl_module: L.LightningModule, local: dict[str, Tensor] | None
) -> dict[str, Tensor] | None:
    """Every rank's rows, once each by ``index``, in index order (``None`` if no rank had any).

    Predictions are small (a few numbers a sample), so they travel as pickled objects on Lightning's
    process group; every rank takes part in the collective, rank 0 writes."""
    shards = [] if local is None else [local]
    if trainer.world_size > 1:
        gathered: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, local)
        shards = [s for s in gathered if s is not None]
    if not shards:
        return None
    rows = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    order = torch.argsort(rows["index"], stable=True)
    index = rows["index"][order]
    keep = torch.ones_like(index, dtype=torch.bool)
    keep[1:] = index[1:] != index[:-1]  # a padding sampler's repeats
    return {k: v[order[keep]] for k, v in rows.items()}


def write_predictions(rows: dict[str, Tensor], path: Path) -> None:
    """One CSV row per sample: index, target, group, pred and the logits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        n_logits = rows["logits"].shape[1]
        writer.writerow([*COLUMNS, *[f"logit_{k}" for k in range(n_logits)]])
        for i in range(len(rows["index"])):
            writer.writerow([int(rows[k][i]) for k in COLUMNS] + rows["logits"][i].tolist())
