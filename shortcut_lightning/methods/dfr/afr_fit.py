"""AFR's last-layer refit on embeddings (Qiu et al. 2023): the ERM head retrained on held-out data, each sample
weighted by how badly the ERM model predicts it, with an L2 pull towards the ERM head tuned without group labels."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor

from shortcut_lightning.methods.dfr.fit_pool import FitPool
from shortcut_lightning.methods.dfr.last_layer import LinearHead

L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)  # > 0: separable held-out data leave an unregularised fit unbounded
GAMMA_GRID = (
    0.5,
    1.0,
    2.0,
    4.0,
)  # the paper tunes gamma too (with group labels; here by worst-class accuracy)


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
    """``argmin sum_i w_i CE(W x_i + b, y_i) + l2 ||W - W0||^2`` by L-BFGS from the ERM head ``(W0, b0)``.

    The head, the loss and L-BFGS's state are float64; the two products with ``x`` (the logits and the weight's
    gradient, all the cost) are float32 on ``x`` as embedded, so a fit reads the data in the precision it was
    made in and never copies it (a float64 copy of CelebA's 162k x 2048 embeddings alone is 2.7 GB). The
    gradient is written out, not taken by autograd, so the fit also runs where Lightning's ``validate`` and
    ``test`` hold inference mode (a stage run before them on a loaded checkpoint).

    L-BFGS runs on ``x`` centred at its ``w``-weighted mean ``m`` without copying it: ``W x + b = W (x - m) + c``
    with ``c = b + W m``, an exact reparametrisation (``b`` is not penalised), so the optimum is the same head.
    Pooled post-ReLU embeddings share a large positive mean that couples ``W`` and ``b``; centred, L-BFGS
    needs 2-4x fewer steps to the same loss (``bench/scale.py``).
    """
    data, y = x.float(), y.long()  # no copy for float32 embeddings
    w = w.double()
    center = ((w / w.sum()).float() @ data).double()
    weight, anchor = weight0.double().clone(), weight0.double().clone()
    offset = bias0.double() + weight @ center  # c = b + W m
    onehot = torch.nn.functional.one_hot(y, len(weight)).double()
    optimizer = torch.optim.LBFGS([weight, offset], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        logits = (weight.float() @ data.T).T.double() + (
            offset - weight @ center
        )  # [K, n]: fast for a wide x
        log_p = torch.log_softmax(logits, 1)
        shift = weight - anchor
        loss = -(w * (log_p * onehot).sum(1)).sum() + l2 * shift.pow(2).sum()
        residual = w[:, None] * (log_p.exp() - onehot)  # d loss / d logits
        totals = residual.sum(0)
        weight.grad = (residual.float().T @ data).double() - totals[:, None] * center + 2 * l2 * shift
        offset.grad = totals
        return loss

    optimizer.step(closure)
    return weight, offset - weight @ center


def worst_class_accuracy(pred: Tensor, y: Tensor) -> float:
    return min(float((pred[y == c] == c).double().mean()) for c in torch.unique(y))


def head_logits(x: Tensor, weight: Tensor, bias: Tensor, chunk: int = 8192) -> Tensor:
    """``x @ weight.T + bias`` in float64, a chunk of rows at a time (no float64 copy of ``x``)."""
    parts = [x[i : i + chunk].double() @ weight.T + bias for i in range(0, len(x), chunk)]
    return torch.cat(parts) if parts else torch.empty(0, len(weight), dtype=torch.float64)


def fold_score(
    gamma: float,
    l2: float,
    weight0: Tensor,
    bias0: Tensor,
    num_classes: int,
    bounds: list[int],
    k: int,
    x: Tensor,
    y: Tensor,
    p_true: Tensor,
) -> float:
    """Worst-class accuracy on fold ``k`` of the weighted head fit on the other folds (one cell of the tuning).

    ``x, y, p_true`` hold the folds one after another (fold ``j``: rows ``bounds[j]:bounds[j + 1]``), so the
    fit reads views of the data, not copies, where its folds are adjacent (always with two folds).
    """
    start, stop = bounds[k], bounds[k + 1]
    if start == 0 or stop == len(x):  # the other folds are one block
        fit = slice(stop, len(x)) if start == 0 else slice(0, start)
        fx, fy, fp = x[fit], y[fit], p_true[fit]
    else:
        fx, fy, fp = (torch.cat([t[:start], t[stop:]]) for t in (x, y, p_true))
    weight, bias = fit_weighted_head(fx, fy, afr_weights(fp, fy, gamma, num_classes), weight0, bias0, l2)
    return worst_class_accuracy(head_logits(x[start:stop], weight, bias).argmax(1), y[start:stop])


def fit_afr(
    features: Tensor,
    logits: Tensor,
    target: Tensor,
    weight0: Tensor,
    bias0: Tensor,
    num_classes: int,
    gamma_grid: Sequence[float] = GAMMA_GRID,
    l2_grid: Sequence[float] = L2_GRID,
    folds: int = 2,
    seed: int = 0,
    workers: int | None = 1,
) -> LinearHead:
    """Tune ``(gamma, l2)`` by cross-fitting on the refit data (``folds`` folds: fit on the others, worst-class
    accuracy on the fold, mean over folds; class labels only), then refit on all of it with the best pair.
    ``logits`` are the ERM model's, which give the weights. Returns the head (``c``: the L2 strength, ``tuning``:
    the score of every pair, ``chosen``: both settings).

    Why folds, not one split: the weights put most of a class's mass on the few samples ERM gets wrong, so a
    fit hinges on which of them it sees. On the photo benchmark one 50/50 split chose ``(4, 1.0)`` at 0.91 on
    its held-out half while the refit on all of val fell to 0.23 on a group; with both folds scored that pair
    scores 0.75 and is not chosen.

    Scale: the features stay float32 (:func:`fit_weighted_head`); the folds are laid out one after another
    once (one float32 copy), so every fit reads views of it.
    """
    x, y = features.float(), target.long()
    p_true = torch.softmax(logits.double(), 1).gather(1, y[:, None]).squeeze(1)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    parts = [order[k::folds] for k in range(folds)]
    laid_out = torch.cat(parts)
    bounds = [0, *torch.tensor([len(p) for p in parts]).cumsum(0).tolist()]
    grid = [(float(gamma), float(l2)) for gamma in gamma_grid for l2 in l2_grid]
    tasks = [
        (partial(fold_score, gamma, l2, weight0, bias0, num_classes, bounds, k), 0)
        for gamma, l2 in grid
        for k in range(folds)
    ]
    with FitPool([(x[laid_out], y[laid_out], p_true[laid_out])], workers) as pool:
        scores = pool.map(tasks)
    tuning = {pair: sum(scores[i * folds : (i + 1) * folds]) / folds for i, pair in enumerate(grid)}
    gamma, l2 = max(tuning, key=lambda k: tuning[k])  # ties go to the first pair of the grid
    weight, bias = fit_weighted_head(x, y, afr_weights(p_true, y, gamma, num_classes), weight0, bias0, l2)
    return LinearHead(
        weight=weight.numpy(),
        bias=bias.numpy(),
        c=l2,
        tuning=dict(tuning),
        chosen={"gamma": gamma, "l2": l2},
        zero_fraction=float((weight == 0).all(0).double().mean()),
    )
