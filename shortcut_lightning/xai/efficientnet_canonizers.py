"""LRP for timm's EfficientNet-Lite / MobileNet-style blocks: their residual adds and BatchNormAct layers.

timm's ``DepthwiseSeparableConv`` and ``InvertedResidual`` add their input back (``has_skip``) with a
plain ``+``, which would hand the full relevance to both branches. Their rewritten ``forward`` (a copy of
timm's with the add replaced by :func:`~shortcut_lightning.xai.residual.residual_add`) is registered in
:mod:`shortcut_lightning.xai.canonizers` beside the ResNet blocks. Their BatchNorm is timm's
``BatchNormAct2d`` (BatchNorm and activation in one module, so not a leaf of the module tree):
:class:`MergeBatchNormAct` merges it into the conv before it like zennit's ``SequentialMergeBatchNorm``
does for plain BatchNorm, and the merged module then passes the relevance through its activation
(ReLU6, a ``Hardtanh``: zennit's pass rule), as the composite's rules would.

Refused with :class:`~shortcut_lightning.errors.ModelError` rather than approximated: squeeze-excitation
gates (a product of two activations, e.g. ``efficientnet_b0``), activations other than ReLU/ReLU6
(SiLU has no LRP rule here), space-to-depth stems, anti-aliasing and parts a newer timm may add.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from timm.layers import BatchNormAct2d
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from torch import Tensor, nn
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.types import BatchNorm

from shortcut_lightning.errors import ModelError
from shortcut_lightning.xai.residual import residual_add
from shortcut_lightning.xai.rules import PassThrough

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Identity)


def _separable(self: Any, x: Tensor) -> Tensor:
    shortcut = x
    x = self.bn2(self.conv_pw(self.se(self.aa(self.bn1(self.conv_dw(x))))))
    return residual_add(self, shortcut, self.drop_path(x)) if self.has_skip else x


def _inverted(self: Any, x: Tensor) -> Tensor:
    shortcut = x
    x = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
    x = self.bn3(self.conv_pwl(self.se(self.aa(x))))
    return residual_add(self, shortcut, self.drop_path(x)) if self.has_skip else x


# block class -> (library, rewritten forward, the children that forward knows)
EFFICIENTNET_BLOCKS: dict[type, tuple[str, Callable[..., Tensor], set[str]]] = {
    DepthwiseSeparableConv: (
        "timm",
        _separable,
        {"conv_dw", "bn1", "aa", "se", "conv_pw", "bn2", "drop_path"},
    ),
    InvertedResidual: (
        "timm",
        _inverted,
        {"conv_pw", "bn1", "conv_dw", "bn2", "aa", "se", "conv_pwl", "bn3", "drop_path"},
    ),
}


def check_batchnorm_act(name: str, module: nn.Module) -> None:
    """Refuse a timm ``BatchNormAct2d`` whose activation has no LRP rule here (only ReLU, ReLU6 or none).

    The merged BatchNorm and its activation get zennit's pass rule, which is exact for ReLU-like
    activations only (zero output, zero relevance): on SiLU, GELU or hard-swish it would hand negative
    inputs relevance that never reached the output.
    """
    act = getattr(module, "act", None)
    if isinstance(module, BatchNormAct2d) and not isinstance(act, ACTIVATIONS):
        raise ModelError(
            f"{type(module).__name__} {name!r} uses {type(act).__name__}, which has no LRP rule here (ReLU and "
            "ReLU6 do): use efficientnet_lite0/1/2, or extend shortcut_lightning/xai/efficientnet_canonizers.py"
        )


def check_efficientnet_block(name: str, block: nn.Module) -> None:
    """Refuse an EfficientNet block with a part the rewritten forward or the LRP rules would get wrong."""
    where = f"{type(block).__module__}.{type(block).__qualname__} {name!r}"
    if not isinstance(block.se, nn.Identity):
        raise ModelError(
            f"{where} has a squeeze-excitation gate ({type(block.se).__name__}); LRP has no rule for its product "
            "of activations here. Use an EfficientNet without SE: efficientnet_lite0/1/2"
        )
    if getattr(block, "conv_s2d", None) is not None:
        raise ModelError(
            f"{where} has a space-to-depth stem, which the LRP canonizer does not run; use efficientnet_lite0/1/2 "
            "or extend shortcut_lightning/xai/efficientnet_canonizers.py"
        )
    if not isinstance(block.aa, nn.Identity):
        raise ModelError(
            f"{where} uses anti-aliasing {type(block.aa).__name__}, which has no LRP rule here; use "
            "efficientnet_lite0/1/2 (no anti-aliasing) or extend shortcut_lightning/xai/efficientnet_canonizers.py"
        )
    unknown = sorted(set(dict(block.named_children())) - EFFICIENTNET_BLOCKS[type(block)][2])
    if unknown:
        raise ModelError(
            f"{where} has parts {unknown} that the LRP canonizer (written for timm's forward) does not know: "
            "relevance would be wrong. Extend shortcut_lightning/xai/efficientnet_canonizers.py for this block"
        )
    for child_name, child in block.named_children():
        check_batchnorm_act(f"{name}.{child_name}" if name else child_name, child)


def _leaves(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """The leaf modules in order, by name, a BatchNorm (BatchNormAct2d too) counting as one leaf."""
    children = list(module.named_children())
    if not children or isinstance(module, BatchNorm):
        yield prefix, module
        return
    for name, child in children:
        yield from _leaves(child, f"{prefix}.{name}" if prefix else name)


class MergeBatchNormAct(SequentialMergeBatchNorm):
    """zennit's ``SequentialMergeBatchNorm`` that also merges timm's ``BatchNormAct2d`` into the conv before it.

    zennit walks the leaves of the module tree and merges a BatchNorm that follows a linear layer; a
    ``BatchNormAct2d`` has children (its activation), so zennit never sees it as a leaf and leaves it
    unmerged. Here a BatchNorm counts as a leaf. After the merge a ``BatchNormAct2d`` runs only its
    activation, without an autograd graph, and passes the relevance through (:func:`_merged_forward`).
    For plain BatchNorm layers it does exactly what zennit does.
    Every ``BatchNormAct2d`` of the model (the stem's and head's too, outside any block) must have a
    ReLU, ReLU6 or no activation (:func:`check_batchnorm_act`).
    """

    def apply(self, root_module: nn.Module) -> list[SequentialMergeBatchNorm]:
        leaves = list(_leaves(root_module))
        for name, leaf in leaves:  # all checked before anything is merged: a refusal leaves nothing to undo
            check_batchnorm_act(name, leaf)
        instances, last = [], None
        for _, leaf in leaves:
            if isinstance(last, self.linear_type) and isinstance(leaf, self.batch_norm_type):
                instance = self.copy()
                instance.register((last,), leaf)
                instances.append(instance)
            last = leaf
        return instances

    def register(self, linears: Any, batch_norm: nn.Module) -> None:
        super().register(linears, batch_norm)
        if isinstance(batch_norm, BatchNormAct2d) and type(batch_norm).forward is BatchNormAct2d.forward:
            batch_norm.forward = _merged_forward.__get__(batch_norm)

    def remove(self) -> None:
        super().remove()
        vars(self.batch_norm).pop("forward", None)

    def copy(self) -> MergeBatchNormAct:
        return MergeBatchNormAct()


_PASS = PassThrough()


def _merged_forward(self: Any, x: Tensor) -> Tensor:
    """A merged ``BatchNormAct2d``: its BatchNorm is the identity, so only the activation runs, without a graph.

    LRP gives BatchNorm and ReLU-like activations the pass rule, so autograd's graph through them is
    never used; building it cost a copy of every wide activation (autograd saves ReLU6's input before
    the in-place clamp): a quarter of the LRP forward's cost on efficientnet_lite0. The pass rule
    connects the output to the input instead, whatever rules the composite has. Skipping the identity
    BatchNorm is also exact where zennit's merged one computes ``x / sqrt(1 + eps)``.
    """
    with torch.no_grad():  # detached too: hooks of zennit's own rules on the activation then stand aside
        y = self.act(self.drop(x.detach()))
    connected = _PASS.post_forward(self, (x,), y)
    return y if connected is None else connected


class _DepthwiseMeta(type):
    def __instancecheck__(cls, module: object) -> bool:
        return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


class DepthwiseConvolution(metaclass=_DepthwiseMeta):
    """A layer-map type (``isinstance``) for depthwise convolutions, which get the ``WSquare`` rule.

    A depthwise output channel sees one input channel through k x k weights. Where none of them is
    positive (common in EfficientNet's depthwise kernels) the z+ rule's denominator is 0 and the
    channel's relevance vanishes: z+ everywhere kept 2-5% of the logit at the input of
    ``efficientnet_lite0``. The signed epsilon rule is no better: with 9 terms per output, ``z`` often
    cancels to near 0 and the relevance explodes (1e25 at block 2, measured). ``WSquare`` spreads each
    output's relevance over its taps by ``w^2``, over the taps that read the image (not the padding):
    exact conservation, input-independent at these layers; the 1x1 convolutions around them keep z+.
    """
