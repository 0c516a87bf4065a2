"""Figures of SCORE's mining: the review sheet a person picks ``manual`` indices from, a 2-D view, and where
they are saved."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from shortcut_lightning.data.transforms import denormalize
from shortcut_lightning.methods.score.lrp_analysis import SampleAnalysis
from shortcut_lightning.methods.score.spurious_positives import mask_images
from shortcut_lightning.reporting.figures import new_figure
from shortcut_lightning.reporting.projection import project_2d

FRAME = np.array([0.86, 0.08, 0.08])  # red: the selected samples' frames and indices


def review_sheet(
    images: Tensor,
    masks: Tensor,
    indices: Sequence[int],
    selected: Sequence[int],
    title: str,
    notes: Sequence[str] | None = None,
    columns: int = 10,
    fill: float = 0.0,
) -> Any:
    """One tile per sample, a pair as in Fig. 2 of "Shortcut Mitigation via Spurious-Positive Samples": the
    original beside its masked image (what the model is shown: pixels outside the relevance mask set to
    ``fill``), its dataset index, selected ones framed.

    The original is shown whole, so that a dark sample stays recognisable to a person choosing ``manual``
    indices. ``images`` [N,3,H,W] normalised, ``masks`` [N,1,H,W] bool, ``indices`` the dataset indices (what
    ``manual_indices`` takes), ``notes`` an optional short line per tile (e.g. a score). The tiles are
    one mosaic image with one label per tile: a sheet of 100 renders in a fraction of the time 100
    subplots take, which is most of what mining costs on small images.
    """
    n = len(indices)
    columns = max(1, min(columns, n))
    rows = max(1, math.ceil(n / columns))
    images, masks = images.float().cpu(), masks.cpu()
    pair = [
        denormalize(images),
        torch.ones_like(images[..., :1]),
        denormalize(mask_images(images, masks, fill)),
    ]
    tiles = torch.cat(pair, dim=-1).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # original | white line | masked
    h, w = tiles.shape[1:3]
    gap = max(2, h // 8)  # the frame is drawn in the gap around a tile
    band = round(h * (0.6 if notes else 0.35))  # room for the label above a tile
    cell_h, cell_w = band + h + 2 * gap, w + 2 * gap
    mosaic = np.ones((rows * cell_h, columns * cell_w, 3))
    chosen = {int(i) for i in selected}
    width = 1.3 * columns * w / h
    height = width * mosaic.shape[0] / mosaic.shape[1] + 0.5  # 0.5 inch for the title
    figure = new_figure(width, height)
    figure.suptitle(title, fontsize=9)
    ax = figure.add_axes((0.0, 0.0, 1.0, 1.0 - 0.5 / height))
    for k in range(n):
        top, left = (k // columns) * cell_h + band, (k % columns) * cell_w
        framed = int(indices[k]) in chosen
        if framed:
            mosaic[top : top + h + 2 * gap, left : left + cell_w] = FRAME
        mosaic[top + gap : top + gap + h, left + gap : left + gap + w] = tiles[k]
        label = f"{int(indices[k])}" + (f"\n{notes[k]}" if notes else "")
        color = FRAME if framed else "black"
        ax.text(left + cell_w / 2, top - 1, label, fontsize=6, ha="center", va="bottom", color=color)
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    return figure


def masked_embedding_view(panels: dict[str, dict[str, np.ndarray]], method: str = "pca") -> Any:
    """Per class, a 2-D projection of the top samples' masked-region embeddings (as in Fig. 4 of "Shortcut
    Mitigation via Spurious-Positive Samples").

    ``panels`` maps a class name to ``{"points": [n,2], "selected": bool [n], "spurious": bool [n] or
    absent}``: selected samples are red, the others grey; ground-truth spurious regions (when the data
    has masks) are drawn as rings.
    """
    figure = new_figure(4.2 * len(panels), 4.0)
    for k, (name, panel) in enumerate(panels.items()):
        ax = figure.add_subplot(1, len(panels), k + 1)
        points, selected = panel["points"], panel["selected"]
        ax.scatter(*points[~selected].T, s=14, c="0.6", label="top sample")
        ax.scatter(*points[selected].T, s=18, c="tab:red", label="selected")
        if "spurious" in panel:
            ring = {"s": 60, "facecolors": "none", "edgecolors": "k", "linewidths": 0.7}
            ax.scatter(*points[panel["spurious"]].T, **ring, label="mask mostly on spurious region (oracle)")
        ax.set_title(f"{name}: masked-region embeddings ({method.upper()})", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=6, loc="best")
    # fixed margins: tight_layout would cost about a second per figure
    figure.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.93, wspace=0.05)
    return figure


def selection_panel(found: SampleAnalysis, chosen: list[int], min_overlap: float) -> dict[str, np.ndarray]:
    """A class's panel of :func:`masked_embedding_view`: 2-D points of the masked embeddings, which were selected,
    and (with spurious masks) which overlap the spurious region by ``min_overlap``."""
    points = project_2d(found.embedding.numpy(), method="pca")
    selected = np.zeros(len(points), dtype=bool)
    selected[chosen] = True
    panel = {"points": points, "selected": selected}
    if found.overlap is not None:
        panel["spurious"] = (found.overlap >= min_overlap).numpy()
    return panel


def save_mining_figures(
    trainer: L.Trainer, log_dir: Path, sheets: dict[str, Any], panels: dict[str, dict[str, np.ndarray]]
) -> None:
    """``masked_embeddings.png`` (of ``panels``) and ``review_<class>.png`` (``sheets``) in ``log_dir``, and
    both in TensorBoard where the trainer logs there (rank 0 calls it: the figures are drawn on rank 0)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    view = masked_embedding_view(panels)
    view.savefig(log_dir / "masked_embeddings.png", dpi=100)
    for name, figure in sheets.items():
        figure.savefig(log_dir / f"review_{name}.png", dpi=110)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            for name, figure in sheets.items():
                logger.experiment.add_figure(f"score/review_{name}", figure, global_step=trainer.global_step)
            logger.experiment.add_figure("score/masked_embeddings", view, global_step=trainer.global_step)
