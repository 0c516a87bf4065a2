"""One pass over a split: penultimate embeddings, logits and labels, gathered across DDP ranks."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, fields
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from shortcut_lightning.errors import ShortcutError
from shortcut_lightning.metrics import GroupAccuracy, group_report
from shortcut_lightning.probing.activations import reduce_channels
from shortcut_lightning.probing.hooks import InputCapture, OutputCapture
from shortcut_lightning.probing.model_parts import evaluating

LABELS = ("target", "group", "spurious", "index")


@dataclass
class Embeddings:
    """Rows sorted by ``index`` (the sample's row in its split), one per sample, on the CPU."""

    features: Tensor
    logits: Tensor
    target: Tensor
    group: Tensor
    spurious: Tensor
    index: Tensor

    def __len__(self) -> int:
        return len(self.index)

    def subset(self, rows: Tensor) -> Embeddings:
        return Embeddings(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


@torch.no_grad()
def collect_embeddings(
    pl_module: L.LightningModule,
    loader: Iterable[dict[str, Tensor]],
    head: nn.Module,
    desc: str,
    layer: nn.Module | None = None,
) -> Embeddings:
    """Embeds every batch of ``loader`` with ``pl_module`` in eval mode (each module's mode restored afterwards).

    ``pl_module(images)`` must return logits computed through ``head``. ``features`` are the head's input,
    or with ``layer`` that layer's output averaged over its positions (pixels or tokens). Under DDP each
    rank embeds its shard; the shards are gathered and de-duplicated by ``index`` so every rank returns
    the whole split, identically.
    """
    parts: dict[str, list[Tensor]] = {k: [] for k in ("features", "logits", *LABELS)}
    with ExitStack() as stack:
        capture = stack.enter_context(InputCapture(head))
        at_layer = None if layer is None else stack.enter_context(OutputCapture(layer))
        stack.enter_context(evaluating(pl_module))
        show = getattr(getattr(pl_module, "_trainer", None), "is_global_zero", True)
        for batch in tqdm(loader, desc=desc, leave=False, disable=not show):
            logits = pl_module(batch["image"].to(pl_module.device))
            if capture.value is None:
                raise ShortcutError(
                    f"the model's forward did not call its head {type(head).__name__}: name the head"
                )
            features = capture.value.flatten(1) if at_layer is None else reduce_channels(at_layer.value)
            parts["features"].append(features.float().cpu())
            parts["logits"].append(logits.float().cpu())
            for key in LABELS:  # a label the data lacks (e.g. no group annotations) is -1
                value = batch.get(key) if isinstance(batch, dict) else None
                parts[key].append(
                    torch.full((len(logits),), -1) if value is None else torch.as_tensor(value).cpu()
                )
    local = {k: torch.cat(v) if v else torch.empty(0) for k, v in parts.items()}
    gathered = _gather(pl_module, local)
    if (gathered["index"] < 0).any():  # no sample indices: keep the loader's order
        return Embeddings(**gathered)
    order = torch.argsort(gathered["index"])
    sorted_index = gathered["index"][order]
    keep = torch.ones_like(order, dtype=torch.bool)
    keep[1:] = sorted_index[1:] != sorted_index[:-1]  # drop any repeats a padding sampler added
    rows = order[keep]
    return Embeddings(**{k: v[rows] for k, v in gathered.items()})


def _gather(pl_module: L.LightningModule, local: dict[str, Tensor]) -> dict[str, Tensor]:
    trainer = getattr(pl_module, "_trainer", None)
    if trainer is None or trainer.world_size == 1:
        return local
    strategy = trainer.strategy
    n = torch.tensor([len(local["index"])], device=pl_module.device)
    sizes = strategy.all_gather(n).flatten().tolist()
    longest = int(max(sizes))
    out = {}
    for key, value in local.items():
        padded = torch.zeros((longest, *value.shape[1:]), dtype=value.dtype)
        padded[: len(value)] = value
        everything = strategy.all_gather(padded.to(pl_module.device)).cpu()  # [world, longest, ...]
        out[key] = torch.cat([everything[r, : int(sizes[r])] for r in range(len(sizes))])
    return out


def head_change_reports(
    dm: Any, embeddings: dict[str, Embeddings], weight: Tensor, bias: Tensor | None
) -> dict[str, dict[str, Any]]:
    """Group reports of each split before (the logits of the pass) and after a new head ``weight``/``bias``.

    Only the head changes, so the embeddings of the pass serve both. Every DDP rank holds the gathered
    split already, so the metric does not sum across ranks.
    """
    weight = torch.as_tensor(weight, dtype=torch.float64).cpu()
    shift = 0 if bias is None else torch.as_tensor(bias, dtype=torch.float64).cpu()
    return {
        "before": group_reports(dm, embeddings),
        "after": group_reports(
            dm, embeddings, {s: e.features.double() @ weight.T + shift for s, e in embeddings.items()}
        ),
    }


def group_reports(
    dm: Any, embeddings: dict[str, Embeddings], logits: dict[str, Tensor] | None = None
) -> dict[str, dict[str, Any]]:
    """Group report of each split from the logits of its pass (or the given ``logits`` per split).

    Every DDP rank holds the gathered split already, so the metric does not sum across ranks.
    """
    counts = dm.group_counts("train") if "train" in dm.splits else None
    reports = {}
    for split, emb in embeddings.items():
        metric = GroupAccuracy(dm.num_groups, dm.num_classes, counts, sync_on_compute=False)
        metric.update(emb.logits if logits is None else logits[split], emb.target, emb.group)
        reports[split] = group_report(metric.compute(), dm.group_names, split)
    return reports


def embed_splits(
    pl_module: L.LightningModule, dm: Any, head: nn.Module, splits: Iterable[str], desc: str
) -> dict[str, Embeddings]:
    """:func:`collect_embeddings` of each of ``splits`` that the data has (``desc``: e.g. "DFR: embedding")."""
    return {
        s: collect_embeddings(pl_module, dm.dataloader(s), head, desc=f"{desc} {s}")
        for s in splits
        if s in dm.splits
    }


def split_reports(
    pl_module: L.LightningModule, dm: Any, head: nn.Module, splits: Iterable[str], desc: str
) -> dict[str, dict[str, Any]]:
    """Group report of each of ``splits`` for the model as it is now: :func:`embed_splits`, then :func:`group_reports`."""
    return group_reports(dm, embed_splits(pl_module, dm, head, splits, desc))
