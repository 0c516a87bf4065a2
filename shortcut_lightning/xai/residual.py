"""The residual addition every canonized block calls: the ``Norm`` rule, built in or as a zennit ``Sum``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from shortcut_lightning.xai.rules import ResidualAdd

SUM_ATTRIBUTE, EPSILON_ATTRIBUTE = "lrp_residual_sum", "lrp_residual_epsilon"


def residual_add(block: nn.Module, shortcut: Tensor, x: Tensor) -> Tensor:
    """``shortcut + x`` whose relevance splits in proportion to the two contributions (zennit's ``Norm``).

    The canonizer sets one attribute on ``block``: a ``Sum`` module (the composite's rule for ``Sum``
    applies to the stacked pair) or the stabiliser of :class:`~shortcut_lightning.xai.rules.ResidualAdd`.
    """
    sum_module = getattr(block, SUM_ATTRIBUTE, None)
    if sum_module is not None:
        return sum_module(torch.stack([shortcut, x], dim=-1))
    return ResidualAdd.apply(shortcut, x, getattr(block, EPSILON_ATTRIBUTE))
