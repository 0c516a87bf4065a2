"""Do PruSC's k-means clusters find the minority groups? An analysis with group labels (never a selection rule).

    python -m bench cluster-groups --seeds 0 1 2 [--layers head net.blocks.3 net.blocks.4 net.blocks.5]

For each ERM checkpoint of ``make bench-photos`` (the one every stage starts from) the training split is
embedded at each layer (the head's input, or a layer's output averaged over its positions, as
``MaskPruning(cluster_layer=...)`` does) and clustered as ``MaskPruning`` does: ``num_clusters`` over the
split, or within each class. For every minority group (the smallest group of each class in train) it prints
the cluster that holds the largest share of it, with that cluster's precision (the share of the cluster that
is the group) and recall (the share of the group in that cluster). A cluster-balanced draw up-weights a
minority group only where a cluster isolates it: precision near the group's base rate means it does not.
docs/methods.md (PruSC's clusters, the audit table) and docs/results.md cite its table.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from bench.photo_rows import best_checkpoint
from shortcut_lightning import ShortcutClassifier
from shortcut_lightning.data import Waterbirds
from shortcut_lightning.methods.prusc.clusters import cluster_by_index
from shortcut_lightning.probing.embedding_pass import collect_embeddings
from shortcut_lightning.probing.model_parts import find_head, find_module


def best_cluster(clusters: torch.Tensor, member: torch.Tensor) -> tuple[float, float]:
    """(precision, recall) of the cluster with the most of ``member`` (ties: the more precise)."""
    scores = []
    for k in clusters.unique().tolist():
        inside = clusters == k
        hit = int((inside & member).sum())
        scores.append((hit, hit / int(inside.sum())))
    hit, precision = max(scores)
    return precision, hit / int(member.sum())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--layers", nargs="+", default=["head", "net.blocks.3", "net.blocks.4", "net.blocks.5"]
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["split:12", "class:4", "class:8"],
        help="cluster_within:num_clusters pairs (the suite's PruSC: split:12)",
    )
    parser.add_argument("--root", default="data/photos")
    parser.add_argument("--erm-runs", default="runs/bench_photos/128px/efficientnet_lite0_ERM")


def main(args: argparse.Namespace) -> None:
    dm = Waterbirds(
        root=args.root, image_size=128, batch_size=64, num_workers=2, class_names=["hoofed", "clawed"]
    )
    dm.setup("fit")
    counts = dm.group_counts("train").view(dm.num_classes, dm.n_spurious).double()
    minority = [c * dm.n_spurious + int(counts[c].argmin()) for c in range(dm.num_classes)]
    rows: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for seed in args.seeds:
        erm = next(Path(args.erm_runs).glob(f"*/seed{seed}"), None)
        if erm is None:
            raise SystemExit(f"no ERM run of seed {seed} in {args.erm_runs}: run make bench-photos first")
        model = ShortcutClassifier.load_from_checkpoint(best_checkpoint(erm), map_location="cpu")
        for layer in args.layers:
            at = None if layer == "head" else find_module(model, layer, "--layers")
            embedded = collect_embeddings(
                model, dm.dataloader("train"), find_head(model), f"seed {seed}: {layer}", layer=at
            )
            for setting in args.settings:
                within, k = setting.split(":")
                clusters, _ = cluster_by_index(embedded, int(k), seed=0, within=within)
                for g in minority:
                    found = best_cluster(clusters[embedded.index], embedded.group == g)
                    rows.setdefault((layer, setting, dm.group_names[g]), []).append(found)
    print(
        f"ERM seeds {args.seeds}; train split; precision / recall of the best cluster, mean over seeds (each seed)"
    )
    print("| layer | clusters | " + " | ".join(dm.group_names[g] for g in minority) + " |")
    print("|---|---|" + "---|" * len(minority))
    for layer in args.layers:
        for setting in args.settings:
            cells = []
            for g in minority:
                found = rows[(layer, setting, dm.group_names[g])]
                p, r = statistics.mean(f[0] for f in found), statistics.mean(f[1] for f in found)
                each = ", ".join(f"{f[0]:.2f}/{f[1]:.2f}" for f in found)
                cells.append(f"{p:.2f} / {r:.2f} ({each})")
            print(f"| {layer} | {setting} | " + " | ".join(cells) + " |")
    shares = ", ".join(
        f"{dm.group_names[g]} {float(counts.flatten()[g] / counts[g // dm.n_spurious].sum()):.3f}"
        for g in minority
    )
    print(f"base rate (the group's share of its class in train): {shares}")
