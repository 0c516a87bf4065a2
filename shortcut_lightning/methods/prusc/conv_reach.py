"""Which convolution weights can read an image pixel at a given input size.

A kernel tap whose every read falls in the zero padding multiplies only zeros: it gets no gradient,
and pruning it changes nothing. On small images this is most of a network. A timm ResNet-18 on 32 px
images has layer4 maps of 1x1 (output stride 32) or, dilated, 4x4 (output stride 8, dilation 4), and
in both its 3x3 convolutions read real input through the centre tap only. A pruned share that counts
such weights overstates how much of the working network was removed, so :func:`reachable_weights`
lets ``densities`` report the share among the weights that can act as well.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from shortcut_lightning.probing.model_parts import evaluating

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def reachable_taps(conv: nn.Module, input_size: Sequence[int]) -> Tensor:
    """A boolean over ``conv``'s kernel taps: True where some output position reads a real input position.

    ``input_size`` is the spatial size of the convolution's input (without batch and channels).
    Non-zero padding modes (reflect, replicate, circular) read real values everywhere, so every tap
    counts as reachable there; so it does for a layer that pads inside its own forward (timm's
    ``Conv2dSame``), whose ``padding`` attribute is 0: this never marks a tap that can act as
    unreachable.
    """
    dims = len(conv.kernel_size)
    if len(input_size) != dims:
        raise ValueError(f"{type(conv).__name__} has {dims} spatial dims, the input size {tuple(input_size)}")
    if conv.padding_mode != "zeros":
        return torch.ones(conv.kernel_size, dtype=torch.bool)
    axes = []
    for axis in range(dims):
        size, k = int(input_size[axis]), conv.kernel_size[axis]
        stride, dilation = conv.stride[axis], conv.dilation[axis]
        if conv.padding == "valid":
            pad = 0
        elif conv.padding == "same":
            pad = dilation * (k - 1) // 2
        else:
            pad = conv.padding[axis]
        n_out = size if conv.padding == "same" else (size + 2 * pad - dilation * (k - 1) - 1) // stride + 1
        reads = torch.arange(max(n_out, 0))[:, None] * stride - pad + torch.arange(k)[None, :] * dilation
        axes.append(((reads >= 0) & (reads < size)).any(dim=0))
    grid = axes[0]
    for ax in axes[1:]:
        grid = grid[..., None] & ax
    return grid


@torch.no_grad()
def reachable_weights(model: nn.Module, example: Tensor) -> dict[str, Tensor]:
    """For every convolution of ``model`` by name, its reachable taps (shape ``(1, 1, *kernel)``) on ``example``.

    One forward of ``example`` (a batch, e.g. one image) in eval mode finds each convolution's input
    size; the modes are restored and no statistic moves. A broadcast against the weight gives the
    reachable weights; linear layers always are and are not listed.
    """
    sizes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            sizes.setdefault(name, tuple(args[0].shape[2:]))

        return hook

    hooks = [
        module.register_forward_pre_hook(record(name))
        for name, module in model.named_modules()
        if isinstance(module, CONVS) and name
    ]
    try:
        with evaluating(model):
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    modules = dict(model.named_modules())
    return {name: reachable_taps(modules[name], size)[None, None] for name, size in sizes.items()}


def reachable_of(reachable: dict[str, Tensor], name: str, weight: Tensor) -> Tensor:
    """The reachable weights of module ``name`` as a boolean shaped like ``weight`` (all of an unlisted one)."""
    return reachable.get(name, torch.ones((), dtype=torch.bool)).to(weight.device).expand_as(weight)


class SplitReach:
    """The reachable weights of a model at the image size of a datamodule's ``split``, found once from its first
    image (PruSC's densities and ``target_density`` count among them)."""

    def __init__(self, split: str) -> None:
        self.split = split
        self._found: dict[str, Tensor] | None = None

    def __call__(self, dm: Any, pl_module: L.LightningModule) -> dict[str, Tensor]:
        if self._found is None:
            image = dm.dataset(self.split)[0]["image"]
            self._found = reachable_weights(pl_module, image[None].to(pl_module.device))
        return self._found
