"""AFR's last-layer refit on embeddings (Qiu et al. 2023): the ERM head retrained on held-out data, each sample
weighted by how badly the ERM model predicts it, with an L2 pull towards the ERM head tuned without group labels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from shortcut_lightning.methods.dfr.last_layer import LinearHead

L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)  # > 0: separable held-out data leave an unregularised fit unbounded


def afr_weights(p_true: Tensor, target: Tensor, gamma: float, num_classes: int) -> Tensor:
    """``w_i`` proportional to ``exp(-gamma p_i)`` (``p_i``: the ERM model's probability of the true class), each
    class's weights scaled to the same total, all summing to 1."""
    w = torch.exp(-gamma * p_true.double())
    for c in range(num_classes):
        rows = target == c
        if rows.any():
            w[rows] = w[rows] / w[rows].sum() / len(torch.unique(target))
    return w


def fit_weighted_head(
    x: Tensor, y: Tensor, w: Tensor, weight0: Tensor, bias0: Tensor, l2: float, max_iter: int = 500
) -> tuple[Tensor, Tensor]:
    """``argmin sum_i w_i CE(W x_i + b, y_i) + l2 ||W - W0||^2`` by L-BFGS from the ERM head ``(W0, b0)``."""
    weight = weight0.double().clone().requires_grad_(True)
    bias = bias0.double().clone().requires_grad_(True)
    anchor = weight0.double()
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        losses = torch.nn.functional.cross_entropy(x @ weight.T + bias, y, reduction="none")
        loss = (w * losses).sum() + l2 * (weight - anchor).pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def worst_class_accuracy(pred: Tensor, y: Tensor) -> float:
    return min(float((pred[y == c] == c).double().mean()) for c in torch.unique(y))


def fit_afr(
    features: Tensor,
    logits: Tensor,
    target: Tensor,
    weight0: Tensor,
    bias0: Tensor,
    num_classes: int,
    gamma: float,
    l2_grid: Sequence[float] = L2_GRID,
    seed: int = 0,
) -> LinearHead:
    """Tune the L2 strength on a 50/50 split of the refit data (fit on one half, worst-class accuracy on the other:
    class labels only), then refit on all of it. ``logits`` are the ERM model's, which give the weights."""
    x, y = features.double(), target.long()
    p_true = torch.softmax(logits.double(), 1).gather(1, y[:, None]).squeeze(1)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    fit_rows, held = order[len(x) // 2 :], order[: len(x) // 2]
    w_fit = afr_weights(p_true[fit_rows], y[fit_rows], gamma, num_classes)
    tuning = {}
    for l2 in l2_grid:
        weight, bias = fit_weighted_head(x[fit_rows], y[fit_rows], w_fit, weight0, bias0, float(l2))
        tuning[float(l2)] = worst_class_accuracy((x[held] @ weight.T + bias).argmax(1), y[held])
    best = max(tuning, key=lambda k: tuning[k])  # ties go to the first (smallest) strength of the grid
    weight, bias = fit_weighted_head(x, y, afr_weights(p_true, y, gamma, num_classes), weight0, bias0, best)
    return LinearHead(weight=weight.numpy(), bias=bias.numpy(), c=best, tuning=tuning,
                      zero_fraction=float((weight == 0).all(0).double().mean()))  # fmt: skip
