"""PruSC's clusters: the split's k-means clusters as sampler weights and as a report table."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from shortcut_lightning.errors import ShortcutError
from shortcut_lightning.methods.prusc.kmeans import Clusters, cosine_kmeans
from shortcut_lightning.probing.embedding_pass import Embeddings

ClusterWithin = Literal["split", "class"]  # one k-means over the split (the paper), or one per class


def cluster_by_index(
    embedded: Embeddings,
    num_clusters: int,
    seed: int,
    within: ClusterWithin = "split",
    device: torch.device | str | None = None,
) -> tuple[Tensor, Clusters]:
    """Cosine k-means of the embeddings; the cluster of every sample by its index (-1: not embedded).

    ``within="split"`` makes ``num_clusters`` clusters of all samples (the paper); ``"class"`` makes
    ``num_clusters`` within each class (class labels only), numbered class by class, so every class has
    clusters of its own however much the embedding is shaped by the class. The k-means runs on ``device``
    (default: the CPU, where the embeddings are).
    """
    if within == "split":
        found = cosine_kmeans(embedded.features, num_clusters, seed=seed, device=device)
    else:
        labels = torch.empty(len(embedded), dtype=torch.long)
        centroids, inertia = [], 0.0
        for rank, c in enumerate(embedded.target.unique().tolist()):
            member = embedded.target == c
            if int(member.sum()) < num_clusters:
                raise ShortcutError(
                    f"cluster_within='class': class {c} has {int(member.sum())} samples, fewer than "
                    f"num_clusters={num_clusters}; lower num_clusters"
                )
            part = cosine_kmeans(embedded.features[member], num_clusters, seed=seed, device=device)
            labels[member] = part.labels + rank * num_clusters
            centroids.append(part.centroids)
            inertia += part.inertia * float(member.float().mean())
        found = Clusters(labels, torch.cat(centroids), inertia)
    clusters = torch.full((int(embedded.index.max()) + 1,), -1, dtype=torch.long)
    clusters[embedded.index] = found.labels
    return clusters, found


def cluster_balance_weights(clusters: Tensor, positions: Tensor | None) -> Tensor:
    """Per-sample weights ``1 / size of its cluster`` (``clusters``: by sample index, -1 for none).

    The sizes are counted where the sampler draws (``positions``; ``None``: the whole split), so every
    cluster is drawn equally often.
    """
    drawn = clusters if positions is None else clusters[positions]
    counts = torch.bincount(drawn.clamp(min=0), minlength=int(clusters.max()) + 1).double()
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
