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

from shortcut_lightning.errors import ModelError, ShortcutError
from shortcut_lightning.metrics import GroupAccuracy, group_report
from shortcut_lightning.probing.activations import reduce_channels
from shortcut_lightning.probing.hooks import InputCapture, OutputCapture
from shortcut_lightning.probing.model_parts import evaluating

LABELS = ("target", "group", "spurious", "index")
# where a pass's (large) features end up: on every rank, on rank 0 alone (its decision's input), or nowhere
FEATURES = ("every_rank", "rank_zero", "none")
# bytes per rank and step of the gather to rank 0: bounds the device memory the gather takes
GATHER_CHUNK_BYTES = 64 * 2**20
REPORT_CHUNK_ROWS = 8192  # rows per float64 product of a new head


@dataclass
class Embeddings:
    """Rows sorted by ``index`` (the sample's row in its split), one per sample, on the CPU.

    ``features`` may be empty (no rows) where the pass did not keep them on this rank (:func:`collect_embeddings`'s
    ``features``); :attr:`has_features` says which.
    """

    features: Tensor
    logits: Tensor
    target: Tensor
    group: Tensor
    spurious: Tensor
    index: Tensor

    def __len__(self) -> int:
        return len(self.index)

    @property
    def has_features(self) -> bool:
        """Whether this rank holds a feature row for every sample."""
        return len(self.features) == len(self.index)

    def subset(self, rows: Tensor) -> Embeddings:
        kept = {f.name: getattr(self, f.name) for f in fields(self)}
        return Embeddings(
            **{k: v if k == "features" and not self.has_features else v[rows] for k, v in kept.items()}
        )


@torch.no_grad()
def collect_embeddings(
    pl_module: L.LightningModule,
    loader: Iterable[dict[str, Tensor]],
    head: nn.Module,
    desc: str,
    layer: nn.Module | None = None,
    features: str = "every_rank",
) -> Embeddings:
    """Embeds every batch of ``loader`` with ``pl_module`` in eval mode (each module's mode restored afterwards).

    ``pl_module(images)`` must return logits computed through ``head``. ``features`` are the head's input,
    or with ``layer`` that layer's output averaged over its positions (pixels or tokens). Under DDP each
    rank embeds its shard; the shards are gathered and de-duplicated by ``index``, so every rank returns
    the whole split's logits and labels, identically. The features go where ``features`` says:
    ``every_rank`` (all-gathered), ``rank_zero`` (gathered to rank 0 only, in row chunks: the input of a
    decision rank 0 takes; the other ranks get an empty tensor) or ``none`` (no rank keeps them).

    A sample whose logits or features are not finite stops the pass with a :class:`ModelError` on every
    rank alike (each rank flags its own samples; the flags are gathered with the labels).
    """
    if features not in FEATURES:
        raise ShortcutError(f"features={features!r} is unknown: choose one of {', '.join(FEATURES)}")
    parts: dict[str, list[Tensor]] = {k: [] for k in ("features", "logits", *LABELS, "finite")}
    width = 0
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
            found = capture.value.flatten(1) if at_layer is None else reduce_channels(at_layer.value)
            width = found.shape[1]
            finite = torch.isfinite(found).all(1) & torch.isfinite(logits).all(1)
            parts["finite"].append(finite.to(torch.uint8).cpu())
            if features != "none":
                parts["features"].append(found.float().cpu())
            parts["logits"].append(logits.float().cpu())
            for key in LABELS:  # a label the data lacks (e.g. no group annotations) is -1
                value = batch.get(key) if isinstance(batch, dict) else None
                parts[key].append(
                    torch.full((len(logits),), -1) if value is None else torch.as_tensor(value).cpu()
                )
    local = {k: torch.cat(v) if v else torch.empty(0) for k, v in parts.items()}
    if features == "none" or not parts["features"]:
        local["features"] = torch.empty(0, width)
    gathered = _gather(pl_module, local, features)
    finite = gathered.pop("finite")
    if (gathered["index"] < 0).any():  # no sample indices: keep the loader's order
        rows = torch.arange(len(gathered["index"]))
    else:
        order = torch.argsort(gathered["index"])
        sorted_index = gathered["index"][order]
        keep = torch.ones_like(order, dtype=torch.bool)
        keep[1:] = sorted_index[1:] != sorted_index[:-1]  # drop any repeats a padding sampler added
        rows = order[keep]
    _check_finite(finite[rows], desc)
    held = len(gathered["features"]) == len(gathered["index"])
    return Embeddings(**{k: v[rows] if k != "features" or held else v for k, v in gathered.items()})


def _check_finite(finite: Tensor, desc: str) -> None:
    """One line naming the pass and how many samples gave NaN/inf: the model, not the stage, is at fault."""
    bad = int((finite == 0).sum())
    if bad:
        raise ModelError(
            f"{desc}: {bad} of {len(finite)} samples gave non-finite (NaN or inf) logits or features, so the "
            "model has diverged or overflows: retrain with a lower learning rate, or in full precision "
            "(trainer.precision: 32-true)"
        )


def _gather(pl_module: L.LightningModule, local: dict[str, Tensor], features: str) -> dict[str, Tensor]:
    """Every rank's rows concatenated in rank order: the labels and logits on every rank, the features as
    ``features`` says (rank 0 alone for ``rank_zero``; left empty for ``none``)."""
    trainer = getattr(pl_module, "_trainer", None)
    if trainer is None or trainer.world_size == 1:
        return local
    strategy = trainer.strategy
    mine = local["features"]
    shape = torch.tensor(
        [len(local["index"]), mine.shape[1] if mine.ndim == 2 else 0], device=pl_module.device
    )
    shapes = strategy.all_gather(shape).reshape(-1, 2).cpu()
    sizes, width = [int(n) for n in shapes[:, 0]], int(shapes[:, 1].max())
    if features != "none":  # a rank without rows has no width of its own
        local = {**local, "features": mine.reshape(len(mine), width)}
    out = {}
    for key, value in local.items():
        if key != "features" or features == "every_rank":
            out[key] = _all_gather_rows(strategy, value, sizes, pl_module.device)
    if features == "rank_zero":
        out["features"] = _gather_rows_to_zero(trainer, local["features"], sizes, pl_module.device)
    elif features == "none":
        out["features"] = mine
    return out


def _all_gather_rows(strategy: Any, value: Tensor, sizes: list[int], device: torch.device) -> Tensor:
    """Every rank's ``value`` (``sizes[r]`` rows each), padded to the longest for the collective."""
    padded = torch.zeros((max(sizes), *value.shape[1:]), dtype=value.dtype)
    padded[: len(value)] = value
    everything = strategy.all_gather(padded.to(device)).cpu()  # [world, longest, ...]
    return torch.cat([everything[r, : sizes[r]] for r in range(len(sizes))])


def _gather_rows_to_zero(trainer: L.Trainer, value: Tensor, sizes: list[int], device: torch.device) -> Tensor:
    """Every rank's rows of ``value`` [rows, width] on rank 0 (in rank order), an empty tensor elsewhere.

    ``torch.distributed.gather`` in chunks of rows (padded to equal length), so neither the device nor the
    other ranks ever hold the whole split.
    """
    import torch.distributed as dist

    group = getattr(trainer.strategy, "process_group", None)  # None: the default (Lightning's) group
    rank, world, longest, width = trainer.global_rank, len(sizes), max(sizes), value.shape[1]
    chunk = max(1, GATHER_CHUNK_BYTES // max(1, width * value.element_size()))
    out = torch.empty((sum(sizes) if rank == 0 else 0, width), dtype=value.dtype)
    offsets = [sum(sizes[:r]) for r in range(world)]
    for start in range(0, longest, chunk):
        stop = min(longest, start + chunk)
        piece = torch.zeros((stop - start, width), dtype=value.dtype)
        mine = value[start:stop]
        piece[: len(mine)] = mine
        piece = piece.to(device)
        received = [torch.empty_like(piece) for _ in range(world)] if rank == 0 else None
        dist.gather(piece, received, dst=0, group=group)
        for r, part in enumerate(received or ()):
            take = max(0, min(stop, sizes[r]) - start)
            out[offsets[r] + start : offsets[r] + start + take] = part[:take].cpu()
    return out


def head_change_reports(
    dm: Any, embeddings: dict[str, Embeddings], weight: Tensor, bias: Tensor | None
) -> dict[str, dict[str, Any]]:
    """Group reports of each split before (the logits of the pass) and after a new head ``weight``/``bias``.

    Only the head changes, so the embeddings of the pass serve both; it needs their features, so under DDP
    it runs where they are: on rank 0, inside the broadcast decision (a pass with ``features="rank_zero"``).
    The metric does not sum across ranks. The new logits are float64 products, a chunk of rows at a time.
    """
    weight = torch.as_tensor(weight, dtype=torch.float64).cpu()
    shift = 0 if bias is None else torch.as_tensor(bias, dtype=torch.float64).cpu()
    for split, emb in embeddings.items():
        if not emb.has_features:
            raise ShortcutError(
                f"the {split} pass kept no features on this rank: call head_change_reports on rank 0"
            )

    def logits(features: Tensor) -> Tensor:
        rows = range(0, len(features), REPORT_CHUNK_ROWS)
        products = [features[i : i + REPORT_CHUNK_ROWS].double() @ weight.T + shift for i in rows]
        return torch.cat(products) if products else torch.empty(0, len(weight), dtype=torch.float64)

    return {
        "before": group_reports(dm, embeddings),
        "after": group_reports(dm, embeddings, {s: logits(e.features) for s, e in embeddings.items()}),
    }


def group_reports(
    dm: Any, embeddings: dict[str, Embeddings], logits: dict[str, Tensor] | None = None
) -> dict[str, dict[str, Any]]:
    """Group report of each split from the logits of its pass (or the given ``logits`` per split).

    Every DDP rank holds the gathered logits and labels, so the metric does not sum across ranks.
    """
    counts = dm.group_counts("train") if "train" in dm.splits else None
    reports = {}
    for split, emb in embeddings.items():
        metric = GroupAccuracy(dm.num_groups, dm.num_classes, counts, sync_on_compute=False)
        metric.update(emb.logits if logits is None else logits[split], emb.target, emb.group)
        reports[split] = group_report(metric.compute(), dm.group_names, split)
    return reports


def embed_splits(
    pl_module: L.LightningModule,
    dm: Any,
    head: nn.Module,
    splits: Iterable[str],
    desc: str,
    features: str = "every_rank",
) -> dict[str, Embeddings]:
    """:func:`collect_embeddings` of each of ``splits`` that the data has (``desc``: e.g. "DFR: embedding";
    ``features``: where the features are kept)."""
    return {
        s: collect_embeddings(pl_module, dm.dataloader(s), head, desc=f"{desc} {s}", features=features)
        for s in splits
        if s in dm.splits
    }


def split_reports(
    pl_module: L.LightningModule, dm: Any, head: nn.Module, splits: Iterable[str], desc: str
) -> dict[str, dict[str, Any]]:
    """Group report of each of ``splits`` for the model as it is now: :func:`embed_splits` (logits and labels
    only: no rank keeps the features), then :func:`group_reports`."""
    return group_reports(dm, embed_splits(pl_module, dm, head, splits, desc, features="none"))
