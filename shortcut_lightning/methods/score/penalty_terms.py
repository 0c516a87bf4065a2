"""What :class:`~shortcut_lightning.callbacks.NeuronRegularization` penalises, as functions on tensors.

Three readings of the SCORE paper's "regularization of the spurious neurons" (docs/methods.md, SCORE):

* ``activation``: the selected channels' mean pooled activation (what the stage always did). A network can
  meet it by moving the shortcut to other channels, or by rescaling, without predicting differently.
* ``contribution``: what the selected channels add to the logit of the class they were mined for,
  activation x gradient of that logit at the layer, summed over positions. That is the "reliance" of the
  paper's figures: it is zero only when the channels no longer move that logit. The gradient is taken with
  ``create_graph=True``, so the penalty's own gradient flows through it (a second backward through the part
  of the network above the layer).
* ``masked_logit``: the class evidence the spurious region alone still gives: the cross-entropy of the masked
  image's prediction against the uniform distribution, less ``log K`` (0 when the region favours no class;
  with two classes and a margin ``m`` it grows as ``m / 2``, so its gradient does not vanish on a confident
  shortcut, as an entropy's would).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from shortcut_lightning.probing.activations import reduce_channels

Penalty = Literal["activation", "contribution", "masked_logit"]
Norm = Literal["l1", "l2"]
PENALTIES: tuple[str, ...] = ("activation", "contribution", "masked_logit")


def reduce_norm(values: Tensor, norm: Norm) -> Tensor:
    """Mean absolute value (``l1``) or mean square (``l2``)."""
    return values.abs().mean() if norm == "l1" else values.pow(2).mean()


def channel_contributions(activation: Tensor, logits: Tensor, c: int) -> Tensor:
    """[N, C]: each channel's activation x gradient of logit ``c``, summed over positions (pixels or tokens).

    For a linear head on pooled features this is exactly the channel's term of logit ``c``
    (``w_cj * mean_hw a_j``); the graph is kept, so a penalty on it trains the network."""
    (grad,) = torch.autograd.grad(logits[:, c].sum(), activation, create_graph=True)
    return reduce_channels(activation.float() * grad.float(), "sum")


def activation_term(
    activation: Tensor, neurons: dict[int, Tensor], sample_class: Tensor | None, norm: Norm
) -> Tensor | None:
    """The selected channels' pooled activation: each class's neurons on every row (``sample_class`` None) or
    on the rows of that class; ``None`` when no row applies."""
    pooled = reduce_channels(activation)
    parts = []
    for c, index in neurons.items():
        chosen = pooled[:, index.to(pooled.device)]
        parts.append(chosen if sample_class is None else chosen[sample_class.to(pooled.device) == c])
    values = parts[0] if len(parts) == 1 else torch.cat([p.flatten() for p in parts])
    return reduce_norm(values, norm) if values.numel() else None


def contribution_term(
    activation: Tensor, logits: Tensor, neurons: dict[int, Tensor], sample_class: Tensor | None, norm: Norm
) -> Tensor | None:
    """Per row, the summed contribution of class ``c``'s neurons to logit ``c``, for each class on its rows;
    ``None`` if no row applies."""
    parts = []
    for c, index in neurons.items():
        rows = None if sample_class is None else sample_class.to(logits.device) == c
        if rows is not None and not bool(rows.any()):
            continue
        summed = channel_contributions(activation, logits, c)[:, index.to(logits.device)].sum(1)
        parts.append(summed if rows is None else summed[rows])
    return reduce_norm(torch.cat(parts), norm) if parts else None


def masked_logit_term(logits: Tensor) -> Tensor:
    """The masked images' mean ``KL(uniform || softmax(logits))``: 0 when the spurious region alone favours no
    class, about half the logit margin (two classes) when it decides the class."""
    log_p = logits.float().log_softmax(1)
    return (-log_p.mean(1) - math.log(logits.shape[1])).mean()


def random_neurons(neurons: dict[int, list[int]], channels: int, seed: int) -> dict[int, list[int]]:
    """The control: for each class as many channels as it was given, drawn (seeded, the same on every rank)
    from the layer's channels that no class was given."""
    taken = {n for chosen in neurons.values() for n in chosen}
    free = torch.tensor(sorted(set(range(channels)) - taken), dtype=torch.long)
    drawn = {}
    for c, chosen in neurons.items():
        generator = torch.Generator().manual_seed(seed + c)
        if len(chosen) > len(free):
            raise ValueError(
                f"{len(chosen)} random neurons asked, {len(free)} channels left outside the mined"
            )
        drawn[c] = sorted(free[torch.randperm(len(free), generator=generator)[: len(chosen)]].tolist())
    return drawn
