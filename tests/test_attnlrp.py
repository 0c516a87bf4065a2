"""AttnLRP on timm ViTs: conservation through the blocks, agreement with an independent reference, the model
restored, per-token relevance and per-head attention maps, and refusals of parts without a rule.

Conservation: with biases left out of the rules (``zero_params="bias"``) the relevance summed at the output
of each block equals the target logit; measured ~1e-6 relative (float32, epsilon 1e-9: with the default
1e-6 the stabiliser absorbs up to ~1e-2 of the tiny logits of a random model), the test allows
1e-3. Reference: with every bias zero, LRP-epsilon (epsilon -> 0) on linear maps equals gradient x input, so
our relevance at the first block's input must equal gradient x input of the same network written out by
hand with the attention probabilities and the LayerNorm std detached and GELU's gradient replaced by
gelu(x)/x (the identity rule); measured ~1e-5 relative, allowed 1e-3.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from shortcut_lightning import ModelError
from shortcut_lightning.probing.activations import token_layout
from shortcut_lightning.xai import attention_maps, make_composite, relevance, token_relevance


def make_vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=3, img_size=32, patch_size=4, **kwargs).eval()


def test_conservation_through_blocks():
    model = make_vit()
    x = torch.randn(3, 3, 32, 32)
    blocks = [f"blocks.{i}" for i in range(len(model.blocks))] + ["norm"]
    result = relevance(
        model, x, 2, make_composite("epsilon_plus_flat", model, zero_params="bias", epsilon=1e-9), blocks
    )
    target = result.logits[:, 2]
    for name in blocks:
        total = result.layers[name].sum(1)
        assert torch.allclose(total, target, rtol=1e-3, atol=1e-6), name
    assert result.layers["blocks.0"].shape == (3, model.embed_dim)  # per channel, summed over tokens
    hidden = relevance(model, x, 2, "epsilon_plus_flat", ["blocks.2.mlp.act"]).layers["blocks.2.mlp.act"]
    assert hidden.shape == (3, model.blocks[2].mlp.fc1.out_features)  # an MLP's hidden units


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(-1, keepdim=True)
    std = (centred.detach().pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
    return centred / std * norm.weight


def _reference(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """Gradient x input at the first block's input of the hand-written, linearised network (biases zero)."""
    h0 = model._pos_embed(model.patch_embed(x)).detach().requires_grad_(True)
    h = h0
    for block in model.blocks:
        attn = block.attn
        n, t, c = h.shape
        qkv = attn.qkv(_layer_norm(block.norm1, h)).reshape(n, t, 3, attn.num_heads, attn.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        p = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1).detach()
        h = h + attn.proj((p @ v).transpose(1, 2).reshape(n, t, c))
        f = block.mlp.fc1(_layer_norm(block.norm2, h))
        f = f * (F.gelu(f) / f).detach()
        h = h + block.mlp.fc2(f)
    logits = model.head(_layer_norm(model.norm, h)[:, 0])
    (grad,) = torch.autograd.grad(logits[:, target].sum(), h0)
    return (h0 * grad).sum(-1).detach()


def test_matches_gradient_times_input_of_the_linearised_network():
    model = make_vit()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                module.bias.zero_()
    x = torch.randn(2, 3, 32, 32)
    composite = make_composite("epsilon_plus_flat", model, epsilon=1e-9)
    ours = relevance(model, x, 1, composite, ["norm_pre"], per="position").layers["norm_pre"]
    expected = _reference(model, x, 1)
    assert ours.shape == expected.shape == (2, 65)
    assert torch.allclose(ours, expected, rtol=1e-3, atol=1e-5 * expected.abs().max())


def test_model_restored_and_output_unchanged():
    model = make_vit(global_pool="avg")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    result = relevance(model, x, 0, "epsilon_gamma_box")
    assert torch.allclose(result.logits, before, atol=1e-5)  # the rewritten forward computes the same logits
    with torch.no_grad():
        assert torch.equal(model(x), before)
    for name, param in model.named_parameters():
        assert param is params[name][0] and torch.equal(param, params[name][1])
    for module in model.modules():
        assert "forward" not in module.__dict__ and "pool" not in module.__dict__
        assert not any(name.startswith("lrp_") for name, _ in module.named_children())


def test_average_pool_conserves():
    model = make_vit(global_pool="avg", class_token=False)
    x = torch.randn(2, 3, 32, 32)
    result = relevance(
        model,
        x,
        0,
        make_composite("epsilon_plus_flat", model, zero_params="bias", epsilon=1e-9),
        ["blocks.5"],
    )
    assert torch.allclose(result.layers["blocks.5"].sum(1), result.logits[:, 0], rtol=1e-3, atol=1e-6)


def test_token_relevance_and_attention_maps_on_the_patch_grid():
    model = make_vit()
    x = torch.randn(2, 3, 32, 32)
    grid = token_relevance(model, x, 1, block="blocks.3")
    assert grid.shape == (2, 8, 8) and grid.abs().sum() > 0
    maps = attention_maps(model, x, query=token_layout(model).position(2, 5))
    assert maps.shape == (len(model.blocks), 2, model.blocks[0].attn.num_heads, 8, 8)
    # a query's attention over all tokens sums to 1; the patches hold all but the class token's share
    assert ((maps.sum((-2, -1)) > 0) & (maps.sum((-2, -1)) <= 1 + 1e-5)).all()
    with pytest.raises(ModelError, match="outside the 8x8 patch grid"):
        token_layout(model).position(8, 0)


def test_unsupported_parts_are_refused():
    model = make_vit(global_pool="map")
    with pytest.raises(ModelError, match="pools with attention"):
        relevance(model, torch.randn(1, 3, 32, 32), 0)
    with pytest.raises(ModelError, match="needs a timm vision transformer"):
        token_relevance(timm.create_model("resnet18", num_classes=2), torch.randn(1, 3, 32, 32), 0, "layer1")
