"""Views of a ViT on its patch grid: LRP relevance per token at a block, attention of one query per head."""

from __future__ import annotations

import torch
from timm.models import vision_transformer as timm_vit
from torch import Tensor, nn

from shortcut_lightning.errors import ModelError
from shortcut_lightning.probing.activations import TokenLayout, require_token_layout
from shortcut_lightning.xai.attention import attention_probabilities
from shortcut_lightning.xai.lrp import relevance
from shortcut_lightning.xai.precision import float32_attribution


def token_relevance(
    model: nn.Module, images: Tensor, target: int | Tensor, block: str, composite: str = "epsilon_plus_flat"
) -> Tensor:
    """LRP relevance of class ``target`` per patch token at the output of ``block``: [N, rows, cols]."""
    layout = require_token_layout(model, "token_relevance")
    result = relevance(model, images, target, composite, [block], per="position")
    return layout.to_grid(result.layers[block])


def attention_maps(model: nn.Module, images: Tensor, query: int = 0) -> Tensor:
    """Attention of token ``query`` (0: the class token) over the patches, per block and head: [L, N, heads, rows, cols].

    Recomputed from each block's attention input with the block's own weights (also when timm uses fused
    attention, which never materialises the probabilities). The model is run in its current mode.
    """
    layout = require_token_layout(model, "attention_maps")
    blocks = [m for m in model.modules() if type(m) is timm_vit.Attention]
    if not blocks:
        raise ModelError(f"{type(model).__name__} has no timm ViT attention module")
    inputs: list[Tensor] = []
    handles = [b.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for b in blocks]
    try:
        with torch.no_grad(), float32_attribution(model, images.device.type, "attention_maps"):
            model(images.float())
    finally:
        for handle in handles:
            handle.remove()
    if not 0 <= query < inputs[0].shape[1]:
        raise ModelError(f"query token {query} does not exist: the model has {inputs[0].shape[1]} tokens")
    maps = []
    for block, x in zip(blocks, inputs, strict=True):
        with torch.no_grad(), float32_attribution(model, x.device.type, "attention_maps"):
            probabilities, _ = attention_probabilities(block, x)
        row = probabilities[:, :, query]  # [N, heads, T]
        maps.append(_keys_to_grid(layout, row))
    return torch.stack(maps)


def _keys_to_grid(layout: TokenLayout, row: Tensor) -> Tensor:
    n, heads, _ = row.shape
    return layout.to_grid(row.reshape(n * heads, -1)).reshape(n, heads, *layout.grid)
