"""Finding the layer a probe reads: the one whose global average pool is the penultimate embedding."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from shortcut_lightning.errors import ModelError
from shortcut_lightning.probing.hooks import InputCapture, capturing_outputs
from shortcut_lightning.probing.model_parts import evaluating, last_transformer_block


def find_feature_layer(model: nn.Module, head: nn.Module, images: Tensor) -> str:
    """The default neuron layer: the shallowest module the embedding is the average pool of (a CNN).

    For a class-token ViT: the last block's first LayerNorm, the last layer whose patch tokens still reach
    the class token (through that block's attention). At the block's output only the class token gets a
    gradient, so every patch's Grad-CAM would be zero.
    """
    block = last_transformer_block(model)
    if block is not None:
        return f"{block}.norm1"
    modules = {name: m for name, m in model.named_modules() if name and not isinstance(m, nn.Linear)}
    # a probe must not move BatchNorm statistics
    with (
        capturing_outputs(modules) as captures,
        InputCapture(head) as embedding,
        torch.no_grad(),
        evaluating(model),
    ):
        model(images)
    z = embedding.value.flatten(1)
    found = [
        name
        for name, c in captures.items()
        if isinstance(c.value, Tensor) and c.value.ndim == 4 and is_pooled_layer(c.value, z)
    ]
    if not found:
        raise ModelError(
            "cannot find the layer whose global average pool is the penultimate embedding: name the Grad-CAM "
            "layer with SpuriousScore(layer=...), e.g. layer='net.layer4'"
        )
    return min(found, key=lambda n: n.count("."))


def is_pooled_layer(activation: Tensor, features: Tensor) -> bool:
    """Whether ``features`` is the global average pool of ``activation`` (the one-pass condition)."""
    if activation.ndim != 4 or activation.shape[:2] != features.shape:
        return False
    return torch.allclose(activation.mean(dim=(2, 3)), features, rtol=1e-5, atol=1e-6)
