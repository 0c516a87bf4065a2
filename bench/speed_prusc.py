"""PruSC's speed (``python -m bench speed --only prusc``): a mask-learning step (every conv and linear weight
masked, Gumbel-sigmoid sample, CE + sparsity + SupCon over clusters, Adam on the logits, weights frozen)
against an ERM step (CE, AdamW on the weights) on the same batch, alternating, medians compared."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from bench.speed_epochs import make_model


def _timed(step: Callable[[], None], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_prusc(backbone: str, device: str, steps: int, size: int, batch: int = 64) -> dict[str, Any]:
    """Mask-learning step vs ERM step on one batch (the callback's loss pieces, timed step by step)."""
    from shortcut_lightning.methods.prusc.masks import attach_masks
    from shortcut_lightning.methods.prusc.supcon import cluster_supcon

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 2, (batch,), generator=g).to(device)
    clusters = torch.randint(0, 16, (batch,), generator=g).to(device)
    erm = make_model(backbone).to(device).train()
    erm_opt = torch.optim.AdamW(erm.parameters(), lr=1e-3, weight_decay=1e-4)
    pruned = make_model(backbone).to(device).train()
    masks = attach_masks(pruned)
    for param in pruned.parameters():
        param.requires_grad_(False)
    for mask in masks.values():
        mask.set_mode("learn")
    logits = [m.logits for m in masks.values()]
    mask_opt = torch.optim.Adam(logits, lr=0.05)

    def erm_step() -> None:
        loss = F.cross_entropy(erm(x), y)
        erm_opt.zero_grad(set_to_none=True)
        loss.backward()
        erm_opt.step()

    def mask_step() -> None:
        features = pruned.features(x)
        sparsity = torch.stack([torch.sigmoid(p).sum() for p in logits]).sum()
        loss = (
            F.cross_entropy(pruned.head(features), y)
            + 1e-4 * sparsity
            + cluster_supcon(features, y, clusters)
        )
        mask_opt.zero_grad(set_to_none=True)
        loss.backward()
        mask_opt.step()

    for _ in range(3):  # warm-up
        erm_step(), mask_step()
    erm_s, mask_s = [], []
    for _ in range(steps):
        erm_s.append(_timed(erm_step, device))
        mask_s.append(_timed(mask_step, device))
    return {
        "benchmark": "PruSC mask-learning step vs ERM step, same batch (alternating, medians)",
        "backbone": backbone,
        "batch": batch,
        "image_size": size,
        "device": device,
        "masked_weights": sum(p.numel() for p in logits),
        "erm_step_s": statistics.median(erm_s),
        "mask_step_s": statistics.median(mask_s),
        "ratio": statistics.median(mask_s) / statistics.median(erm_s),
        "target": "<= 1.5",
        "runs_erm_s": erm_s,
        "runs_mask_s": mask_s,
    }
