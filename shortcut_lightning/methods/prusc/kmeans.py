"""k-means with cosine distance in torch: PruSC's unsupervised clusters of the ERM embedding (seed 000)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from shortcut_lightning.errors import ShortcutError


@dataclass
class Clusters:
    """Cluster of every row, unit-norm centroids [k, d] and the mean cosine distance to the own centroid."""

    labels: Tensor
    centroids: Tensor
    inertia: float


def cosine_kmeans(
    x: Tensor, k: int, seed: int = 0, n_init: int = 4, max_iter: int = 100, tol: float = 1e-6
) -> Clusters:
    """Spherical k-means (k-means++ seeding on cosine distance, Lloyd steps), best of ``n_init`` starts.

    Deterministic for a given ``seed`` and ``x`` (a CPU generator draws the seeds), so every DDP rank
    that holds the same gathered embedding gets the same clusters. Runs in float64 on ``x``'s device.
    """
    n = len(x)
    if not 1 <= k <= n:
        raise ShortcutError(f"cannot make {k} clusters of {n} samples: choose num_clusters between 1 and {n}")
    z = F.normalize(x.double(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    best: Clusters | None = None
    for _ in range(n_init):
        centroids = _plus_plus(z, k, generator)
        previous = float("inf")
        for _ in range(max_iter):
            labels = (z @ centroids.T).argmax(1)
            sums = torch.zeros_like(centroids).index_add_(0, labels, z)
            empty = sums.norm(dim=1) == 0
            centroids = torch.where(empty[:, None], centroids, F.normalize(sums, dim=1))
            inertia = float((1 - (z * centroids[labels]).sum(1)).mean())
            if previous - inertia <= tol:
                break
            previous = inertia
        labels = (z @ centroids.T).argmax(1)
        inertia = float((1 - (z * centroids[labels]).sum(1)).mean())
        if best is None or inertia < best.inertia:
            best = Clusters(labels.cpu(), centroids.float().cpu(), inertia)
    assert best is not None
    return best


def _plus_plus(z: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding with the cosine distance: each new centroid drawn in proportion to its distance."""
    first = int(torch.randint(len(z), (1,), generator=generator))
    chosen = [first]
    distance = (1 - z @ z[first]).clamp_min(0)
    for _ in range(1, k):
        weights = distance.cpu()
        if float(weights.sum()) <= 0:  # fewer distinct points than k: take any not yet chosen
            taken = set(chosen)
            rest = [i for i in range(len(z)) if i not in taken]
            nxt = rest[int(torch.randint(len(rest), (1,), generator=generator))]
        else:
            nxt = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(nxt)
        distance = torch.minimum(distance, (1 - z @ z[nxt]).clamp_min(0))
    return z[chosen].clone()
