"""k-means with cosine distance in torch: PruSC's unsupervised clusters of the ERM embedding ("Pruning Spurious
Correlations", Le et al.)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from shortcut_lightning.errors import ShortcutError

CHUNK_ROWS = 4096  # rows per product with the centroids: bounds the temporaries at CelebA scale
MARGIN = 1e-4  # a row keeps its centroid unchecked only this far inside its bounds: float32 noise is ~1e-6


@dataclass
class Clusters:
    """Cluster of every row, unit-norm centroids [k, d] and the mean cosine distance to the own centroid."""

    labels: Tensor
    centroids: Tensor
    inertia: float


def cosine_kmeans(
    x: Tensor,
    k: int,
    seed: int = 0,
    n_init: int = 4,
    max_iter: int = 100,
    tol: float = 1e-6,
    device: torch.device | str | None = None,
) -> Clusters:
    """Spherical k-means (k-means++ seeding on cosine distance, Lloyd steps), best of ``n_init`` starts.

    Runs in float32 on ``device`` (default: ``x``'s; PruSC passes the module's, the GPU where there is one),
    with the centroids' sums in float64. Each Lloyd step assigns every row to its nearest centroid, but
    checks only the rows whose bounds allow a change (Hamerly's bounds on the chord distance between unit
    vectors, which orders rows as the cosine does): the labels are Lloyd's, and once the centroids settle a
    step costs a small share of a pass over the rows. Deterministic for a given ``seed``, ``x`` and device:
    a CPU generator draws the seeds, and the sums are ``index_add_`` on the CPU and a one-hot product on a
    GPU (whose ``index_add_`` adds in a racy order).
    """
    n = len(x)
    if not 1 <= k <= n:
        raise ShortcutError(f"cannot make {k} clusters of {n} samples: choose num_clusters between 1 and {n}")
    z = F.normalize(x.to(device or x.device, torch.float32), dim=1)
    generator = torch.Generator().manual_seed(seed)
    best: Clusters | None = None
    for _ in range(n_init):
        centroids = _plus_plus(z, k, generator)
        state = _Assignment(z, centroids)
        previous = float("inf")
        for _ in range(max_iter):
            norms = state.sums.norm(dim=1)
            unit = (state.sums / norms[:, None].clamp_min(1e-300)).float()
            moved = torch.where((norms == 0)[:, None], centroids, unit)
            # the mean cosine distance of every row to its new centroid: 1 - sum over clusters |sum| / n
            inertia = float(1 - norms.sum() / n)
            state.follow(centroids, moved)
            centroids = moved
            if previous - inertia <= tol:
                break
            previous = inertia
        inertia = float(1 - (state.sums * centroids.double()).sum() / n)  # rows to their nearest centroid
        if best is None or inertia < best.inertia:
            best = Clusters(state.labels.cpu(), centroids.cpu(), inertia)
    assert best is not None
    return best


class _Assignment:
    """The nearest centroid of every row, with Hamerly's bounds and the float64 sum of each cluster's rows.

    ``upper``: at least the chord distance of a row to its centroid; ``lower``: at most its distance to any
    other centroid. A row is checked again only where its bounds no longer prove its centroid nearest.
    """

    def __init__(self, z: Tensor, centroids: Tensor) -> None:
        self.z, self.k = z, len(centroids)
        self.labels = torch.full((len(z),), -1, dtype=torch.long, device=z.device)  # -1: not assigned yet
        self.upper = torch.zeros(len(z), dtype=torch.float64, device=z.device)
        self.lower = torch.zeros(len(z), dtype=torch.float64, device=z.device)
        self.sums = torch.zeros(self.k, z.shape[1], dtype=torch.float64, device=z.device)
        self._check(None, centroids)

    def follow(self, old: Tensor, new: Tensor) -> None:
        """Reassign every row after the centroids moved from ``old`` to ``new``."""
        if self.k == 1:
            return
        shift = (new.double() - old.double()).norm(dim=1)
        self.upper += shift[self.labels]
        top = shift.topk(2)  # the largest shift of a centroid other than the row's own
        self.lower -= torch.where(self.labels == top.indices[0], top.values[1], top.values[0])
        between = _chord(new.double() @ new.double().T)
        between.fill_diagonal_(float("inf"))
        half = between.min(1).values / 2  # nearer than this to its centroid: no other is nearer
        self._check(self.upper + MARGIN > torch.maximum(half[self.labels], self.lower), new)

    def _check(self, unproven: Tensor | None, centroids: Tensor) -> None:
        """Exact nearest centroid and bounds of the ``unproven`` rows (``None``: all), a chunk at a time; a chunk
        with many is taken whole (a slice of the rows, no copy: rechecking a proven row changes nothing)."""
        for start in range(0, len(self.z), CHUNK_ROWS):
            block = self.z[start : start + CHUNK_ROWS]
            rows = torch.arange(start, start + len(block), device=self.z.device)
            if unproven is not None:
                mask = unproven[start : start + len(block)]
                count = int(mask.sum())
                if count == 0:
                    continue
                if count <= len(block) // 4:
                    rows = rows[mask]
                    block = self.z[rows]
            top = (block @ centroids.T).topk(min(2, self.k), dim=1)
            nearest, before = top.indices[:, 0], self.labels[rows]
            changed = nearest != before
            if changed.all():  # a row that moves leaves its old cluster's sum for the new one's
                self._add(block, before, nearest)
            elif changed.any():
                self._add(block[changed], before[changed], nearest[changed])
            self.labels[rows] = nearest
            self.upper[rows] = _chord(top.values[:, 0].double())
            self.lower[rows] = _chord(top.values[:, 1].double()) if self.k > 1 else float("inf")

    def _add(self, values: Tensor, left: Tensor, joined: Tensor) -> None:
        """Moves rows ``values`` from the clusters ``left`` (-1: none) to ``joined`` in the float64 sums."""
        values = values.double()
        if values.is_cuda:
            keep = (left >= 0).double()[:, None]
            self.sums += (
                F.one_hot(joined, self.k).double() - F.one_hot(left.clamp_min(0), self.k) * keep
            ).T @ values
        else:
            self.sums.index_add_(0, joined, values)
            if (left >= 0).any():
                self.sums.index_add_(0, left[left >= 0], values[left >= 0], alpha=-1)


def _chord(similarity: Tensor) -> Tensor:
    """The Euclidean distance between unit vectors of cosine ``similarity``: a metric, so Hamerly's bounds hold."""
    return (2 - 2 * similarity).clamp_min(0).sqrt()


def _plus_plus(z: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding with the cosine distance: each new centroid drawn in proportion to its distance."""
    first = int(torch.randint(len(z), (1,), generator=generator))
    chosen = [first]
    distance = (1 - z @ z[first]).clamp_min(0)
    for _ in range(1, k):
        weights = distance.double().cpu()
        if float(weights.sum()) <= 0:  # fewer distinct points than k: take any not yet chosen
            taken = set(chosen)
            rest = [i for i in range(len(z)) if i not in taken]
            nxt = rest[int(torch.randint(len(rest), (1,), generator=generator))]
        else:
            nxt = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(nxt)
        distance = torch.minimum(distance, (1 - z @ z[nxt]).clamp_min(0))
    return z[chosen].clone()
