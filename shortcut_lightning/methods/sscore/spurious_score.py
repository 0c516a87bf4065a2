"""``SpuriousScore``: the neuron spurious score (s-score) of every penultimate neuron, and s-score pruning."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from tqdm.auto import tqdm

from shortcut_lightning.data.base import MASK_SOURCES, require_group_datamodule
from shortcut_lightning.data.transforms import denormalize
from shortcut_lightning.errors import DataError, ModelError
from shortcut_lightning.probing.embedding_pass import embed_splits, head_change_reports
from shortcut_lightning.probing.hooks import OutputCapture
from shortcut_lightning.probing.layers import find_feature_layer
from shortcut_lightning.probing.model_parts import evaluating, find_head, find_module
from shortcut_lightning.reporting.figures import new_figure
from shortcut_lightning.reporting.stage_report import stage_tables
from shortcut_lightning.stages import ModelStage, decide_on_rank_zero
from shortcut_lightning.xai.gradcam import SCALINGS, neuron_gradcam, score_maps


def check_resolution(model: nn.Module, layer: nn.Module, name: str, image: Tensor) -> None:
    """A 1x1 map is uniform over the image: its s-score would only be the mask's share of the image."""
    with OutputCapture(layer) as capture, torch.no_grad(), evaluating(model):
        model(image)
    if capture.value.ndim == 4 and capture.value.shape[-2:] == (1, 1):
        raise ModelError(
            f"layer {name!r} has a 1x1 map at {tuple(image.shape[-2:])} px input, so every Grad-CAM map covers the "
            "whole image and the s-score degenerates to the mask's area share: use larger images, a layer "
            "with a spatial map, or a backbone with a smaller output stride (model.backbone_kwargs: "
            "{output_stride: 8} for timm ResNets)"
        )


class SpuriousScore(ModelStage):
    """Neuron spurious score for every penultimate neuron (section 3.3 of "An XAI-based Analysis of Shortcut
    Learning in Neural Networks", Le et al.; below: the XAI-based analysis).

    Over ``n_samples`` samples of ``split`` whose spurious mask is not empty: the Grad-CAM map of each
    penultimate neuron at ``layer`` (by default the last block, whose average pool is the embedding:
    all maps from one forward pass), upsampled to the image, scaled to max 1 and binarised at
    ``alpha``; the s-score is the share of that focus region inside the spurious mask, averaged over
    the samples. Writes ``sscore.csv`` (neuron, score, focus share, head weight norm), ``sscore.json`` (summary:
    the mean over all neurons, over those the head reads, and weighted by the head's absolute weights,
    which is the figure a head refit such as DFR can change; pruning report), a histogram and the mean to TensorBoard, and ``sscore_heatmaps.png``: the maps
    of a low, a mid and a high s-score neuron over a few images (the XAI-based analysis, Fig. 4).

    Two references come with the scores, because a map that covers the whole image scores the mask's share
    of the image: ``uniform_map_score`` (that share, averaged over the samples: what a neuron that looks
    everywhere scores, 0.89 for a Waterbirds-like background) and ``mean_focus_share`` (how much of the
    image the focus regions cover; per neuron as ``focus_share`` in the CSV). A mean s-score that rises
    together with the focus share may only say that the maps got broader (``bench/sscore_shift.py``
    separates the two).

    ``prune_above``: zero the head weights of neurons scoring above it (the XAI-based analysis, Table 4) and report
    group accuracy before and after on ``report_splits``.

    Runs at the end of ``fit``, and in ``validate``/``test`` once before the loop. The samples are the
    same on every DDP rank and the computation deterministic, so every rank gets the same scores.

    Args:
        split: where the samples come from (``train``, as in the XAI-based analysis).
        n_samples: samples with a non-empty mask (the XAI-based analysis: 50).
        alpha: binarisation threshold on the max-scaled map.
        layer: dotted name of the Grad-CAM layer; default: found.
        head: dotted name of the head; default: found.
        prune_above: zero the head weights of neurons with a higher s-score.
        seed: which samples are drawn.
        interpolation: upsampling of the maps (``bilinear`` or ``nearest``).
        report_splits: splits reported before and after pruning.
        scaling: how a map is scaled before binarising: ``max`` (divided by its peak, as the XAI-based
            analysis does) or ``minmax``.
            ``sscore.json``'s ``views`` holds the mean three ways (:func:`mean_views`) under both scalings.

    Example::

        trainer = L.Trainer(max_epochs=6, callbacks=[SpuriousScore(prune_above=0.7)])
        trainer.fit(ShortcutClassifier("resnet18"), datamodule=SyntheticShortcuts())
    """

    def __init__(
        self,
        split: str = "train",
        n_samples: int = 50,
        alpha: float = 0.5,
        layer: str | None = None,
        head: str | None = None,
        prune_above: float | None = None,
        seed: int = 0,
        interpolation: str = "bilinear",
        report_splits: tuple[str, ...] = ("val", "test"),
        scaling: str = "max",
    ) -> None:
        if scaling not in SCALINGS:
            raise ModelError(f"scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")
        if not 0.0 < alpha <= 1.0:
            raise ModelError(f"alpha must lie in (0, 1], got {alpha}")
        if n_samples < 1:
            raise ModelError(f"n_samples must be at least 1, got {n_samples}")
        super().__init__()
        self.split = split
        self.n_samples = n_samples
        self.alpha = alpha
        self.layer = layer
        self.head_path = head
        self.prune_above = prune_above
        self.changes_model_at_fit_end = prune_above is not None
        self.seed = seed
        self.interpolation = interpolation
        self.report_splits = tuple(report_splits)
        self.scaling = scaling

    stage_label = "s-score"
    report_file = "sscore.json"
    saves = "sscore"  # with prune_above: the pruned model
    uses_annotations = True  # spurious-region masks
    changes_model_at_fit_end = False  # an instance with prune_above prunes the head at the end of fit

    @property
    def before_reports(self) -> dict[str, dict[str, Any]]:
        """The model before s-score pruning (empty without ``prune_above``)."""
        return self.report.get("pruning", {}).get("before", {})

    # -- what ----------------------------------------------------------------------------------
    def samples(self, dm: Any) -> dict[str, Tensor]:
        """``n_samples`` samples of ``split`` with a non-empty mask, in a seeded order: images, masks, index."""
        dataset = dm.dataset(self.split)
        if not dataset.has_masks:
            raise DataError(
                f"SpuriousScore needs spurious-region masks, but the {self.split} split of {type(dm).__name__} has "
                f"none: {MASK_SOURCES}"
            )
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed)).tolist()
        picked = []
        for i in tqdm(order, desc="s-score: picking masked samples", leave=False, mininterval=2):
            sample = dataset[i]
            if sample["mask"].any():
                picked.append(sample)
                if len(picked) == self.n_samples:
                    break
        if not picked:
            raise DataError(f"no sample of the {self.split} split has a non-empty spurious mask")
        return {k: torch.stack([torch.as_tensor(s[k]) for s in picked]) for k in ("image", "mask", "index")}

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Scores every penultimate neuron; prunes if asked; returns (and keeps) the report."""
        dm = require_group_datamodule(getattr(trainer, "datamodule", None), "SpuriousScore")
        head = find_head(pl_module, self.head_path)
        batch = self.samples(dm)
        with evaluating(pl_module):
            images = batch["image"].to(pl_module.device)
            layer_name = self.layer or find_feature_layer(pl_module, head, images[:2])
            layer = find_module(pl_module, layer_name, "layer")
            check_resolution(pl_module, layer, layer_name, images[:1])
            maps = [
                neuron_gradcam(pl_module, images[i : i + 8], layer, head) for i in range(0, len(images), 8)
            ]
        all_maps = torch.cat([m.maps for m in maps]).cpu()
        usage = head.weight.detach().abs().sum(0).cpu()  # how much the head reads each neuron
        used = usage > 0
        views = {}
        for scaling in SCALINGS:
            found = score_maps(all_maps, batch["mask"], self.alpha, self.interpolation, scaling)
            views[scaling] = mean_views(found[0], used)
            if scaling == self.scaling:
                scores, shares = found
        report: dict[str, Any] = {
            "split": self.split,
            "n_samples": len(batch["index"]),
            "sample_index": batch["index"].tolist(),
            "alpha": self.alpha,
            "scaling": self.scaling,
            "layer": layer_name,
            "one_pass": maps[0].fast,
            "mean": float(scores.mean()),
            "mean_used_neurons": float(scores[used].mean()) if used.any() else None,
            "head_weighted_mean": float((scores * usage).sum() / usage.sum()) if used.any() else None,
            "uniform_map_score": float(batch["mask"].flatten(1).float().mean(1).mean()),
            "mean_focus_share": float(shares.mean()),
            "views": views,
            "n_neurons": len(scores),
            "n_used_neurons": int(used.sum()),
            "ranges": {
                "low (<0.2)": int((scores < 0.2).sum()),
                "mid": int(((scores >= 0.2) & (scores <= 0.7)).sum()),
                "high (>0.7)": int((scores > 0.7).sum()),
            },
        }
        if self.prune_above is not None:
            report["pruning"] = self._prune(trainer, pl_module, dm, head, scores)
        self._write(trainer, self.log_dir(trainer), report, scores, shares, head, batch, all_maps)
        return report

    def _prune(
        self, trainer: L.Trainer, pl_module: L.LightningModule, dm: Any, head: nn.Linear, scores: Tensor
    ) -> dict:
        pruned = (scores > self.prune_above).nonzero().flatten()
        # the features serve only the reports, computed on rank 0 and broadcast: no other rank holds them
        embeddings = embed_splits(
            pl_module, dm, head, self.report_splits, "s-score pruning: embedding", features="rank_zero"
        )
        with torch.no_grad():
            head.weight[:, pruned.to(head.weight.device)] = 0.0
        weight = head.weight.detach().cpu()
        bias = None if head.bias is None else head.bias.detach().cpu()
        reports = decide_on_rank_zero(trainer, lambda: head_change_reports(dm, embeddings, weight, bias))
        return {"threshold": self.prune_above, "neurons": pruned.tolist(), **reports}

    # -- output --------------------------------------------------------------------------------
    @rank_zero_only
    def _write(
        self,
        trainer: L.Trainer,
        log_dir: Path,
        report: dict[str, Any],
        scores: Tensor,
        shares: Tensor,
        head: nn.Linear,
        batch: dict[str, Tensor],
        maps: Tensor,
    ) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        norms = head.weight.detach().norm(dim=0).cpu()
        with (log_dir / "sscore.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["neuron", "s_score", "focus_share", "head_weight_norm"])
            for i, (s, f, w) in enumerate(zip(scores.tolist(), shares.tolist(), norms.tolist(), strict=True)):
                writer.writerow([i, f"{s:.6f}", f"{f:.6f}", f"{w:.6g}"])
        figure = heatmap_grid(batch, maps, scores)
        figure.savefig(log_dir / "sscore_heatmaps.png", dpi=100)
        scalars = {"sscore/mean": report["mean"]}
        if "pruning" in report:
            for key in ("before", "after"):
                for split, r in report["pruning"][key].items():
                    if r["wga"] is not None:
                        scalars[f"sscore_pruning/{split}/wga_{key}"] = r["wga"]
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram("sscore/neurons", scores, global_step=trainer.global_step)
                logger.experiment.add_figure("sscore/heatmaps", figure, global_step=trainer.global_step)
        summary = [
            f"s-score over {report['n_samples']} {self.split} samples at {report['layer']}: mean {report['mean']:.3f} "
            f"(a map covering the whole image scores {report['uniform_map_score']:.3f}; the focus regions cover "
            f"{report['mean_focus_share']:.3f} of the image on average), {report['ranges']}"
        ]
        tables = None
        if "pruning" in report:
            summary.append(
                f"pruned {len(report['pruning']['neurons'])} neurons with s-score > {self.prune_above}"
            )
            tables = stage_tables(
                {"before": report["pruning"]["before"], "pruned": report["pruning"]["after"]}
            )
        self.write_report(trainer, report, summary, tables, log_dir=log_dir)


def mean_views(scores: Tensor, used: Tensor) -> dict[str, float | None]:
    """The mean s-score three ways: over ``all`` neurons (the average of the XAI-based analysis: a neuron whose
    map is empty, e.g. one PruSC pruned, scores 0), over the ``head_connected`` ones (``used``: the head reads
    them), and over all with the disconnected ones counted as 0 (``disconnected_as_zero``: what the classifier
    can still see)."""
    return {
        "all": float(scores.mean()),
        "head_connected": float(scores[used].mean()) if used.any() else None,
        "disconnected_as_zero": float((scores * used).mean()),
    }


def heatmap_grid(batch: dict[str, Tensor], maps: Tensor, scores: Tensor, n_images: int = 5) -> Any:
    """Rows: the lowest-, median- and highest-scoring neuron; columns: images with the neuron's map on top."""
    order = torch.argsort(scores)
    rows = {"low": order[0], "mid": order[len(order) // 2], "high": order[-1]}
    n = min(n_images, len(maps))
    figure = new_figure(2 * n, 2.1 * len(rows))
    size = tuple(batch["image"].shape[-2:])
    for r, (label, neuron) in enumerate(rows.items()):
        up = torch.nn.functional.interpolate(
            maps[:n, neuron : neuron + 1], size=size, mode="bilinear", align_corners=False
        )
        for c in range(n):
            ax = figure.add_subplot(len(rows), n, r * n + c + 1)
            image = denormalize(batch["image"][c].cpu()).permute(1, 2, 0).numpy()
            ax.imshow(image)
            heat = up[c, 0].numpy()
            ax.imshow(heat / heat.max() if heat.max() > 0 else heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ax.contour(
                batch["mask"][c, 0].numpy().astype(np.float32), levels=[0.5], colors="white", linewidths=0.6
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"{label}: n{int(neuron)}\ns={float(scores[neuron]):.2f}", fontsize=8)
    figure.suptitle("Grad-CAM of penultimate neurons (white: spurious mask)", fontsize=9)
    figure.tight_layout()
    return figure
