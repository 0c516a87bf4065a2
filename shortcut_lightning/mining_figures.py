"""Figures of SCORE's mining: the review sheet a person picks ``manual`` indices from, and a 2-D view."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

from shortcut_lightning.data.transforms import denormalize
from shortcut_lightning.figures import new_figure


def review_sheet(
    images: Tensor,
    masks: Tensor,
    indices: Sequence[int],
    selected: Sequence[int],
    title: str,
    notes: Sequence[str] | None = None,
    columns: int = 10,
) -> Any:
    """One tile per sample: the image dimmed outside its relevance mask, its dataset index, selected ones framed.

    ``images`` [N,3,H,W] normalised, ``masks`` [N,1,H,W] bool, ``indices`` the dataset indices (what
    ``manual_indices`` takes), ``notes`` an optional short line per tile (e.g. a score).
    """
    n = len(indices)
    columns = max(1, min(columns, n))
    rows = max(1, math.ceil(n / columns))
    figure = new_figure(1.3 * columns, 1.45 * rows + 0.5)
    figure.suptitle(title, fontsize=9)
    chosen = set(int(i) for i in selected)
    shown = denormalize(images.float().cpu()) * (0.25 + 0.75 * masks.float().cpu())
    for k in range(n):
        ax = figure.add_subplot(rows, columns, k + 1)
        ax.imshow(shown[k].permute(1, 2, 0).numpy())
        label = f"{int(indices[k])}" + (f"\n{notes[k]}" if notes else "")
        framed = int(indices[k]) in chosen
        ax.set_title(label, fontsize=6, color="red" if framed else "black", pad=2)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor("red" if framed else "none")
            spine.set_linewidth(2.5 if framed else 0)
    figure.tight_layout(pad=0.3, rect=(0, 0, 1, 1 - 0.5 / (1.45 * rows + 0.5)))  # room for the title
    return figure


def masked_embedding_view(panels: dict[str, dict[str, np.ndarray]], method: str = "pca") -> Any:
    """Per class, a 2-D projection of the top samples' masked-region embeddings (seed 002, Fig. 4).

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
            truth = panel["spurious"]
            ax.scatter(*points[truth].T, s=60, facecolors="none", edgecolors="k", linewidths=0.7,
                       label="mask mostly on spurious region (oracle)")  # fmt: skip
        ax.set_title(f"{name}: masked-region embeddings ({method.upper()})", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=6, loc="best")
    figure.tight_layout()
    return figure
