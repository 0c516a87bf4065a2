"""PruSC's first step: embed a split with the ERM model and cluster it, the same clusters on every rank."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from shortcut_lightning.methods.prusc.clusters import cluster_by_index
from shortcut_lightning.methods.prusc.kmeans import Clusters
from shortcut_lightning.probing.embedding_pass import Embeddings, collect_embeddings
from shortcut_lightning.probing.model_parts import find_head, find_module
from shortcut_lightning.stages import decide_on_rank_zero


def cluster_split(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    split: str,
    num_clusters: int,
    seed: int,
    within: str = "split",
    layer: str | None = None,
    tag: str = "",
) -> tuple[Tensor, Clusters, Embeddings]:
    """The cluster of every sample of ``split`` by its index, the k-means result and the embeddings.

    The split is embedded with evaluation transforms at ``layer`` (a module name; default: the head's
    input) and clustered with cosine k-means (``within``: ``split`` or ``class``) in float32 on the module's
    device. The features reach rank 0 alone, which runs the k-means and broadcasts its clusters, so under DDP
    every rank has the same clusters by construction; the returned embeddings carry the features on rank 0
    only (every rank has the labels).
    """
    module = None if layer is None else find_module(pl_module, layer, "cluster_layer")
    embedded = collect_embeddings(
        pl_module, trainer.datamodule.dataloader(split), find_head(pl_module),
        desc=f"PruSC: embedding {split}", layer=module, features="rank_zero",
    )  # fmt: skip
    clusters, found = decide_on_rank_zero(
        trainer, lambda: cluster_by_index(embedded, num_clusters, seed, within, device=pl_module.device)
    )
    where = "" if within == "split" else " in each class"
    at = "" if layer is None else f" at {layer}"
    rank_zero_info(f"PruSC{tag}: {num_clusters} clusters{where} of the {split} split{at} (cosine k-means)")
    return clusters, found, embedded
