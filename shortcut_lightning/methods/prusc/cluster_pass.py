"""PruSC's first step: embed a split with the ERM model and cluster it, the same clusters on every rank."""

from __future__ import annotations

import logging

import lightning as L
from torch import Tensor

from shortcut_lightning.methods.prusc.arguments import PruSCConfig
from shortcut_lightning.methods.prusc.clusters import cluster_by_index, cluster_table
from shortcut_lightning.methods.prusc.prusc_report import PruSCReport, model_reports
from shortcut_lightning.probing.embedding_pass import collect_embeddings
from shortcut_lightning.probing.model_parts import find_head, find_module
from shortcut_lightning.reporting.rank_zero_log import rank_zero_log
from shortcut_lightning.stages import decide_on_rank_zero

log = logging.getLogger(__name__)


def cluster_split(
    trainer: L.Trainer, pl_module: L.LightningModule, config: PruSCConfig
) -> tuple[Tensor, PruSCReport]:
    """The cluster of every sample of ``config.split`` by its index, and the stage's report begun with them.

    The split is embedded with evaluation transforms at ``config.cluster_layer`` (a module name; default: the
    head's input) and clustered with cosine k-means (``cluster_within``: ``split`` or ``class``) in float32 on
    the module's device. The features reach rank 0 alone, which runs the k-means and broadcasts its clusters,
    so under DDP every rank has the same clusters by construction. The report holds the clusters' table (every
    rank has the labels), the k-means inertia, the group reports of the model before the stage and the
    stage's parameters.
    """
    split, layer, dm = config.split, config.cluster_layer, trainer.datamodule
    module = None if layer is None else find_module(pl_module, layer, "cluster_layer")
    desc = f"PruSC: embedding {split}"
    embedded = collect_embeddings(
        pl_module, dm.dataloader(split), find_head(pl_module), desc=desc, layer=module, features="rank_zero"
    )
    clusters, found = decide_on_rank_zero(
        trainer,
        lambda: cluster_by_index(
            embedded, config.num_clusters, config.seed, config.cluster_within, device=pl_module.device
        ),
    )
    tag = "" if config.groups is None else " [uses group annotations: groups]"
    where = "" if config.cluster_within == "split" else " in each class"
    at = "" if layer is None else f" at {layer}"
    rank_zero_log(
        log, f"PruSC{tag}: {config.num_clusters} clusters{where} of the {split} split{at} (cosine k-means)"
    )
    report = PruSCReport(
        uses_annotations=config.groups is not None,
        clusters=cluster_table(found.labels, embedded.target, embedded.group, dm),
        kmeans_inertia=found.inertia,
        before=model_reports(pl_module, config.report_splits, "before"),
        parameters=config.parameters(),
    )
    return clusters, report
