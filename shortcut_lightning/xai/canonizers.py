"""zennit canonizers for the residual blocks of torchvision's and timm's ResNets and timm's EfficientNet blocks.

(ViTs: :mod:`.attention`; the EfficientNet forwards and their BatchNormAct merge: :mod:`.efficientnet_canonizers`.)

LRP needs every residual addition to split the relevance between the two branches in proportion to
their contributions (zennit's ``Norm`` rule). Left as a plain ``+``, autograd hands the FULL relevance
to both branches and the total doubles at every block. zennit's own ``ResNetCanonizer`` rewrites
torchvision's blocks only; timm's ``BasicBlock``/``Bottleneck`` are other classes, so on a timm ResNet it
silently does nothing. :class:`ResidualBlockCanonizer` rewrites both families' ``forward`` (a copy of the
library's forward with ``x + shortcut`` replaced by :class:`~shortcut_lightning.xai.rules.ResidualAdd`,
or by a zennit ``Sum`` module over the stacked pair when the composite's own rule for ``Sum`` should
apply) and :func:`canonizers_for` adds BatchNorm merging. Parts a copied forward does not know
(squeeze-excitation gates, blur pooling, children added by a newer library version) are refused with a
:class:`~shortcut_lightning.errors.ModelError` rather than ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from zennit.canonizers import AttributeCanonizer, Canonizer
from zennit.layer import Sum

from shortcut_lightning.errors import ModelError
from shortcut_lightning.xai.attention import VIT_CLASSES, ViTCanonizer, check_vit_module, has_vit_modules
from shortcut_lightning.xai.efficientnet_canonizers import (
    EFFICIENTNET_BLOCKS,
    MergeBatchNormAct,
    check_efficientnet_block,
)
from shortcut_lightning.xai.residual import EPSILON_ATTRIBUTE, SUM_ATTRIBUTE, residual_add

try:  # timm is a dependency, but keep the torchvision path usable without it
    from timm.models import resnet as timm_resnet
except ImportError:  # pragma: no cover
    timm_resnet = None


def _torchvision_basic(self: Any, x: Tensor) -> Tensor:
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    shortcut = x if self.downsample is None else self.downsample(x)
    return self.relu(residual_add(self, shortcut, out))


def _torchvision_bottleneck(self: Any, x: Tensor) -> Tensor:
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    shortcut = x if self.downsample is None else self.downsample(x)
    return self.relu(residual_add(self, shortcut, out))


def _timm_basic(self: Any, x: Tensor) -> Tensor:
    out = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
    out = self.bn2(self.conv2(out))
    if self.drop_path is not None:
        out = self.drop_path(out)
    shortcut = x if self.downsample is None else self.downsample(x)
    return self.act2(residual_add(self, shortcut, out))


def _timm_bottleneck(self: Any, x: Tensor) -> Tensor:
    out = self.act1(self.bn1(self.conv1(x)))
    out = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(out)))))
    out = self.bn3(self.conv3(out))
    if self.drop_path is not None:
        out = self.drop_path(out)
    shortcut = x if self.downsample is None else self.downsample(x)
    return self.act3(residual_add(self, shortcut, out))


_TV_BASIC = {"conv1", "bn1", "relu", "conv2", "bn2", "downsample"}
_TIMM_BASIC = {"conv1", "bn1", "drop_block", "act1", "aa", "conv2", "bn2", "act2", "downsample", "drop_path"}
# block class -> (library, rewritten forward, the children that forward knows)
_BLOCKS: dict[type, tuple[str, Callable[..., Tensor], set[str]]] = {
    tv_resnet.BasicBlock: ("torchvision", _torchvision_basic, _TV_BASIC),
    tv_resnet.Bottleneck: ("torchvision", _torchvision_bottleneck, _TV_BASIC | {"conv3", "bn3"}),
}
if timm_resnet is not None:
    _BLOCKS[timm_resnet.BasicBlock] = ("timm", _timm_basic, _TIMM_BASIC)
    _BLOCKS[timm_resnet.Bottleneck] = ("timm", _timm_bottleneck, _TIMM_BASIC | {"act3", "conv3", "bn3"})
_BLOCKS.update(EFFICIENTNET_BLOCKS)

SUPPORTED_BLOCKS = tuple(f"{cls.__module__}.{cls.__qualname__}" for cls in (*_BLOCKS, *VIT_CLASSES[1:]))


def _check_block(name: str, block: nn.Module) -> None:
    """Refuse a known block with parts the rewritten forward would skip or mishandle."""
    if type(block) in EFFICIENTNET_BLOCKS:
        check_efficientnet_block(name, block)
        return
    library, _, known = _BLOCKS[type(block)]
    where = f"{type(block).__module__}.{type(block).__qualname__} {name!r}"
    if getattr(block, "se", None) is not None:
        raise ModelError(
            f"{where} has an attention gate ({type(block.se).__name__}); LRP has no rule for its product of "
            "activations here. Use a ResNet without attention (resnet18/34/50/101, resnext, wide_resnet)"
        )
    unknown = sorted(set(dict(block.named_children())) - known)
    if unknown:
        raise ModelError(
            f"{where} has parts {unknown} that the LRP canonizer (written for {library}'s forward) does not know: "
            "relevance would be wrong. Extend shortcut_lightning/xai/canonizers.py for this block"
        )
    aa = getattr(block, "aa", None)
    if aa is not None and not isinstance(aa, (nn.Identity, nn.AvgPool2d)):
        raise ModelError(
            f"{where} uses anti-aliasing {type(aa).__name__}, which has no LRP rule; use a plain ResNet"
        )


class ResidualBlockCanonizer(AttributeCanonizer):
    """Gives the residual add of torchvision's and timm's ResNet blocks and timm's EfficientNet blocks the ``Norm`` rule.

    By default the add is :class:`~shortcut_lightning.xai.rules.ResidualAdd` (stabiliser ``epsilon``);
    ``sum_module=True`` makes it a zennit ``Sum`` module instead, which the composite's rule for ``Sum``
    attributes (zennit's composites give it ``Norm``; slower: the pair is stacked into a new tensor).
    Applying it sets an instance ``forward`` and one attribute on each block; removing it deletes both,
    which brings back the class's own forward.

    Example::

        composite = EpsilonPlusFlat(canonizers=[MergeBatchNormAct(), ResidualBlockCanonizer()])
    """

    def __init__(self, epsilon: float = 1e-6, sum_module: bool = False) -> None:
        self.epsilon, self.sum_module = float(epsilon), sum_module
        super().__init__(self._block_attributes)

    def _block_attributes(self, name: str, module: nn.Module) -> dict[str, Any] | None:
        """zennit ``attribute_map``: a rewritten ``forward`` and the add's rule for every known residual block."""
        if type(module) not in _BLOCKS:
            return None
        _check_block(name, module)
        forward = _BLOCKS[type(module)][1].__get__(module)
        if self.sum_module:
            return {"forward": forward, SUM_ATTRIBUTE: Sum()}
        return {"forward": forward, EPSILON_ATTRIBUTE: self.epsilon}

    def copy(self) -> ResidualBlockCanonizer:
        return ResidualBlockCanonizer(self.epsilon, self.sum_module)


def residual_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The known residual blocks of ``model`` by name (each is validated: unsupported parts raise ModelError)."""
    blocks = {name: module for name, module in model.named_modules() if type(module) in _BLOCKS}
    for name, block in blocks.items():
        _check_block(name, block)
    return blocks


def canonizers_for(model: nn.Module, epsilon: float = 1e-6, sum_module: bool = False) -> list[Canonizer]:
    """Canonizers for LRP on ``model``: merge each BatchNorm into the conv before it, rewrite residual adds.

    Residual adds use ``epsilon`` as the ``Norm`` rule's stabiliser (``sum_module``: see
    :class:`ResidualBlockCanonizer`). timm vision transformers also get
    :class:`~shortcut_lightning.xai.attention.ViTCanonizer` (its attention and token-pooling rules use ``epsilon``).

    BatchNorm merging uses the running statistics (the model must be in eval mode when attributing, as
    :func:`~shortcut_lightning.xai.lrp.relevance` ensures). Plain models (no residual blocks, e.g. VGG)
    get the merge only. Residual blocks of a kind this module does not know cannot be recognised from the
    module tree; :func:`~shortcut_lightning.xai.lrp.relevance` catches them when the forward combines two
    activations outside a canonized block, and raises :class:`ModelError` naming the block class.
    """
    residual_blocks(model)
    canonizers: list[Canonizer] = [MergeBatchNormAct(), ResidualBlockCanonizer(epsilon, sum_module)]
    if has_vit_modules(model):
        for name, module in model.named_modules():
            if type(module) in VIT_CLASSES:
                check_vit_module(name, module)
        canonizers.append(ViTCanonizer(epsilon))
    return canonizers
