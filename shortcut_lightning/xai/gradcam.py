"""Grad-CAM of every penultimate neuron at a chosen layer, and the neuron spurious score (s-score).

Grad-CAM of penultimate neuron ``z_i`` at layer ``A`` (C x h x w): ``relu(sum_k alpha_ik A_k)`` with
``alpha_ik = mean_hw dz_i/dA_k``. When ``z`` is the global average pool of ``A`` (a CNN's last block),
``dz_i/dA_k = delta_ik / (h w)`` is constant over space, so the map is ``relu(A_i) / (h w)``: every
neuron's map comes from ONE forward pass. Other layers use a batched Jacobian (one backward per chunk
of neurons, vectorised over them). A ViT layer's tokens [N, T, C] are read as a map over the patch grid
(prefix tokens dropped), as "An XAI-based Analysis of Shortcut Learning in Neural Networks" (Le et al.)
does for its ViTs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shortcut_lightning.errors import ModelError
from shortcut_lightning.probing.activations import require_token_layout
from shortcut_lightning.probing.hooks import layer_and_embedding
from shortcut_lightning.probing.layers import is_pooled_layer
from shortcut_lightning.xai.precision import float32_attribution


@dataclass
class NeuronMaps:
    """Grad-CAM maps [N, K, h, w] of K penultimate neurons at the layer's resolution; ``fast``: the one-pass path."""

    maps: Tensor
    neurons: Tensor
    fast: bool


def _forward(model: nn.Module, layer: nn.Module, head: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """(layer output A [N,C,h,w], penultimate z [N,d]) of one forward pass."""
    return layer_and_embedding(model, layer, head, images)


def neuron_gradcam(
    model: nn.Module,
    images: Tensor,
    layer: nn.Module,
    head: nn.Module,
    neurons: Tensor | None = None,
    chunk: int = 64,
) -> NeuronMaps:
    """Grad-CAM maps of penultimate neurons (``neurons``; default all) at ``layer`` for a batch.

    The model is used as it is (call it in eval mode). Gradients are enabled locally, also inside
    Lightning's ``inference_mode`` evaluation loops.
    """
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        float32_attribution(model, images.device.type, "Grad-CAM"),
    ):
        x = images.float().clone()
        activation, features = _forward(model, layer, head, x)
        if neurons is None:
            neurons = torch.arange(features.shape[1])
        neurons = neurons.to(features.device)
        if is_pooled_layer(activation, features):
            maps = activation.detach()[:, neurons].relu() / (activation.shape[2] * activation.shape[3])
            return NeuronMaps(maps, neurons.cpu(), fast=True)
        layout = require_token_layout(model, "Grad-CAM of a token layer") if activation.ndim == 3 else None
        grid = activation.detach() if layout is None else layout.to_grid(activation.detach())
        parts = []
        for start in range(0, len(neurons), chunk):
            ids = neurons[start : start + chunk]
            cotangents = torch.zeros(
                (len(ids), *features.shape), device=features.device, dtype=features.dtype
            )
            cotangents[torch.arange(len(ids)), :, ids] = 1.0
            (grads,) = torch.autograd.grad(
                features, activation, grad_outputs=cotangents, is_grads_batched=True, retain_graph=True
            )  # [K, N, C, h, w] (tokens: [K, N, T, C])
            if layout is not None:
                grads = layout.to_grid(grads.flatten(0, 1)).unflatten(0, grads.shape[:2])
            alpha = grads.mean(dim=(3, 4), keepdim=True)
            cams = (alpha * grid.unsqueeze(0)).sum(dim=2).relu()  # [K, N, h, w]
            parts.append(cams.transpose(0, 1))
        return NeuronMaps(torch.cat(parts, dim=1), neurons.cpu(), fast=False)


SCALINGS = ("max", "minmax")


def binarize(
    maps: Tensor, size: tuple[int, int], alpha: float, mode: str = "bilinear", scaling: str = "max"
) -> Tensor:
    """Upsample maps [N,K,h,w] to ``size``, scale each to [0, 1], keep pixels >= ``alpha`` (empty maps stay empty).

    ``scaling="max"`` divides by the map's peak (as the XAI-based analysis does); ``"minmax"`` maps its minimum
    to 0 and its peak to 1, so that a map positive everywhere (a broad, weak floor under a focus) binarises to
    its focus alone.
    """
    if scaling not in SCALINGS:
        raise ModelError(f"scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")
    corners = {} if mode == "nearest" else {"align_corners": False}
    up = F.interpolate(maps, size=size, mode=mode, **corners)
    peak = up.amax(dim=(2, 3), keepdim=True)
    low = up.amin(dim=(2, 3), keepdim=True) if scaling == "minmax" else torch.zeros_like(peak)
    span = peak - low
    scaled = torch.where(span > 0, (up - low) / span.clamp(min=1e-12), torch.zeros_like(up))
    return (scaled >= alpha) & (peak > 0) & (span > 0)


def spurious_overlap(binary: Tensor, masks: Tensor) -> Tensor:
    """Per sample and neuron, the share of the focus region inside the spurious mask [N, K] (0 if no focus)."""
    focus = binary.flatten(2).sum(-1).float()
    inside = (binary & masks.bool()).flatten(2).sum(-1).float()
    return torch.where(focus > 0, inside / focus.clamp(min=1), torch.zeros_like(focus))


def spurious_scores(
    maps: Tensor, masks: Tensor, alpha: float, mode: str = "bilinear", scaling: str = "max"
) -> Tensor:
    """s-score of each neuron [K]: the overlap of its binarised Grad-CAM with the spurious mask, averaged over samples.

    ``maps`` [N,K,h,w] from :func:`neuron_gradcam`, ``masks`` [N,1,H,W] bool.
    """
    return score_maps(maps, masks, alpha, mode, scaling)[0]


def score_maps(
    maps: Tensor, masks: Tensor, alpha: float, mode: str = "bilinear", scaling: str = "max"
) -> tuple[Tensor, Tensor]:
    """Per neuron [K], averaged over samples: the s-score, and the share of the image its focus region covers.

    The focus share tells a neuron that looks everywhere (share 1; its s-score is then just the mask's share
    of the image) from one that looks at a spot. Samples are processed one at a time so the upsampled maps
    of all neurons never sit in memory together.
    """
    scores, shares = [], []
    for j in range(len(maps)):
        binary = binarize(maps[j : j + 1].float(), tuple(masks.shape[-2:]), alpha, mode, scaling)
        scores.append(spurious_overlap(binary, masks[j : j + 1].to(binary.device)))
        shares.append(binary.flatten(2).float().mean(-1))
    return torch.cat(scores).mean(dim=0), torch.cat(shares).mean(dim=0)
