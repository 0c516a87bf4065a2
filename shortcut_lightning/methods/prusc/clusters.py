"""PruSC's clusters: the split's k-means clusters as sampler weights and as a report table."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from shortcut_lightning.methods.prusc.kmeans import Clusters, cosine_kmeans
from shortcut_lightning.probing.embedding_pass import Embeddings


def cluster_by_index(embedded: Embeddings, num_clusters: int, seed: int) -> tuple[Tensor, Clusters]:
    """Cosine k-means of the embeddings; the cluster of every sample by its index (-1: not embedded)."""
    found = cosine_kmeans(embedded.features, num_clusters, seed=seed)
    clusters = torch.full((int(embedded.index.max()) + 1,), -1, dtype=torch.long)
    clusters[embedded.index] = found.labels
    return clusters, found


def cluster_balance_weights(clusters: Tensor, positions: Tensor | None, num_clusters: int) -> Tensor:
    """Per-sample weights ``1 / size of its cluster`` (``clusters``: by sample index, -1 for none).

    The sizes are counted where the sampler draws (``positions``; ``None``: the whole split), so every
    cluster is drawn equally often.
    """
    drawn = clusters if positions is None else clusters[positions]
    counts = torch.bincount(drawn.clamp(min=0), minlength=num_clusters).double()
    labels = clusters.clamp(min=0)
    return torch.where(clusters >= 0, 1.0 / counts[labels].clamp(min=1), 0.0)


def cluster_table(labels: Tensor, target: Tensor, group: Tensor, dm: Any) -> list[dict[str, Any]]:
    """Size, classes and (for the report only) groups of every cluster; ``dm`` names them."""
    rows = []
    for k in range(int(labels.max()) + 1):
        member = labels == k
        row: dict[str, Any] = {"cluster": k, "n": int(member.sum())}
        row["classes"] = {dm.class_names[c]: int((target[member] == c).sum()) for c in range(dm.num_classes)}
        if (group >= 0).all():
            row["groups"] = {dm.group_names[g]: int((group[member] == g).sum()) for g in range(dm.num_groups)}
        rows.append(row)
    return rows
