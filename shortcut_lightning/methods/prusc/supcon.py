"""PruSC's loss term: a supervised contrastive loss over clusters ("Pruning Spurious Correlations", Le et al.),
one matrix op for the whole batch, plus the masks' sparsity."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from shortcut_lightning.errors import ShortcutError
from shortcut_lightning.methods.prusc.masks import GumbelSigmoidMask, Sparsity, sparsity_term


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


class ClusterPenalty:
    """``lambda_sparse * sparsity + beta * SupCon``: what ``MaskPruning`` adds to the loss while the masks learn.

    SupCon reads the normalised penultimate features of the training forward and the clusters of the batch's
    samples (by their ``index``); the clusters are copied to the features' device once. Logs
    ``train/prusc/supcon`` and ``train/prusc/sparsity``.
    """

    def __init__(self, lambda_sparse: float, beta: float, temperature: float, sparsity: Sparsity) -> None:
        self.lambda_sparse = lambda_sparse
        self.beta = beta
        self.temperature = temperature
        self.sparsity = sparsity
        self._clusters: tuple[Tensor, Tensor] | None = (
            None  # the clusters given, and their copy on the device
        )

    def __call__(
        self,
        pl_module: L.LightningModule,
        batch: Any,
        outputs: dict[str, Tensor],
        masks: dict[str, GumbelSigmoidMask],
        clusters: Tensor,
    ) -> Tensor:
        if "features" not in outputs:
            raise ShortcutError(
                "MaskPruning needs the penultimate features of the training forward: pass "
                "{'features': features, 'logits': logits} to total_penalty in training_step"
            )
        features = outputs["features"]
        sparsity = sparsity_term(masks, self.sparsity)
        if (
            self._clusters is None
            or self._clusters[0] is not clusters
            or self._clusters[1].device != features.device
        ):
            self._clusters = (clusters, clusters.to(features.device))
        supcon = cluster_supcon(
            features, batch["target"], self._clusters[1][batch["index"]], self.temperature
        )
        n = len(batch["target"])
        pl_module.log("train/prusc/supcon", supcon.detach(), on_step=True, on_epoch=True, batch_size=n)
        pl_module.log("train/prusc/sparsity", sparsity.detach(), on_step=True, on_epoch=True, batch_size=n)
        return self.lambda_sparse * sparsity + self.beta * supcon
