"""The refit benchmark (``python -m bench speed --only dfr``): DFR's refit (C tuning + 20 refits, embeddings
given) in one process and in one per core, and AFR's refit, each against one ERM epoch (plain loop) on the
embedded default's training set."""

from __future__ import annotations

import time
from typing import Any

import torch

from bench.speed_epochs import plain_epoch
from shortcut_lightning import SyntheticShortcuts
from shortcut_lightning.methods.dfr.afr_fit import fit_afr
from shortcut_lightning.methods.dfr.fit_pool import available_cores
from shortcut_lightning.methods.dfr.last_layer import C_GRID, fit_dfr
from shortcut_lightning.probing.embedding_pass import collect_embeddings


def bench_dfr(backbone: str, device: str, repeats: int) -> dict[str, Any]:
    """DFR refit time vs one ERM epoch over the default synthetic training set (3000 images); AFR beside it."""
    dm = SyntheticShortcuts()
    dm.setup("fit")
    epoch_s, model = plain_epoch(dm, backbone, device)  # embeddings of the model this epoch trained
    head = model.head
    train = collect_embeddings(model, dm.dataloader("train"), head, "embedding train")
    val = collect_embeddings(model, dm.dataloader("val"), head, "embedding val")
    cores = available_cores()
    times: dict[int, list[float]] = {1: [], cores: []}
    afr_times = []
    for _ in range(repeats):
        for workers in times:
            start = time.perf_counter()
            x_val, x_train = val.features.double().numpy(), train.features.double().numpy()
            fit_dfr(
                x_val, val.target.numpy(), val.group.numpy(), x_train, dm.num_classes, C_GRID, 20, 0, workers
            )
            times[workers].append(time.perf_counter() - start)
        start = time.perf_counter()
        bias = head.bias.detach() if head.bias is not None else torch.zeros(head.out_features)
        fit_afr(val.features, val.logits, val.target, head.weight.detach(), bias, dm.num_classes)
        afr_times.append(time.perf_counter() - start)
    refit_s, sequential_s = min(times[cores]), min(times[1])
    return {
        "benchmark": "DFR refit (tuning + 20 fits, embeddings given) vs one ERM epoch (plain loop)",
        "backbone": backbone,
        "n_train": len(train),
        "n_refit": len(val),
        "features": val.features.shape[1],
        "erm_epoch_s": epoch_s,
        "workers": cores,
        "refit_s": refit_s,
        "runs_refit_s": times[cores],
        "sequential_refit_s": sequential_s,
        "runs_sequential_refit_s": times[1],
        "ratio": refit_s / epoch_s,
        "sequential_ratio": sequential_s / epoch_s,
        "target": "<= 0.10",
        "afr_refit_s": min(afr_times),
        "runs_afr_refit_s": afr_times,
        "afr_ratio": min(afr_times) / epoch_s,
        "afr_target": "<= 1",
    }
