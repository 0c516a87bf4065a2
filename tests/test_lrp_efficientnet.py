"""LRP on timm's EfficientNet-Lite: residual adds, BatchNormAct merging and depthwise convolutions.

Conservation as in tests/test_lrp.py: with biases left out of the rules, the relevance summed at every
stage's output and at the input equals the target logit (measured ~1e-4 relative on the ImageNet
weights; the tests allow 1e-3). Each part of the canonizer is switched off once to show the test can
fail: without the residual canonizer the input total is 2^9 = 512 times the logit (lite0 has 9 skip
blocks) and LRP is refused; zennit's own BatchNorm merge leaves timm's BatchNormAct2d unmerged; the z+
rule on depthwise convolutions loses most of the relevance. As for ResNets, the model comes back exactly
(parameters, buffers, hooks, train/eval flags), also after a refusal half-way through canonizing, and
parts the canonizer does not know (SE gates, other activations, anti-aliasing, new children) are refused.
Our fast rules give zennit's own rules' relevance (2e-7 relative) with the same canonizers.
BatchNorm statistics come from 64 px passes: at 32 px the last stages are 1x1 and some running
variances fall to 1e-10, an ill-conditioned network even in float64.
"""

from __future__ import annotations

import pytest
import timm
import torch
from test_lrp import assert_unchanged, images, relative_errors, snapshot, with_bn_statistics
from timm.layers import BatchNormAct2d
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from torch import nn
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import LayerMapComposite, SpecialFirstLayerMapComposite
from zennit.layer import Sum
from zennit.rules import Epsilon, Flat, Norm, Pass, WSquare, ZPlus
from zennit.types import Activation, AvgPool, BatchNorm, Convolution

import shortcut_lightning.xai.canonizers as canonizers_module
from shortcut_lightning import ModelError, ShortcutClassifier, ShortcutError
from shortcut_lightning.xai import ResidualBlockCanonizer, canonizers_for, make_composite, relevance
from shortcut_lightning.xai.efficientnet_canonizers import DepthwiseConvolution, MergeBatchNormAct
from shortcut_lightning.xai.rules import (
    EpsilonDirect,
    NormDirect,
    PassThrough,
    WSquareDirect,
    ZPlusNonNegative,
)

STAGES = [f"net.blocks.{i}" for i in range(7)] + ["net.bn2"]


@pytest.fixture(scope="module")
def lite0():
    torch.manual_seed(0)
    model = ShortcutClassifier("efficientnet_lite0", num_classes=2, weights="imagenet", head_init="linear")
    return model.eval()


@pytest.fixture(scope="module")
def lite0_random():
    torch.manual_seed(0)
    model = ShortcutClassifier("efficientnet_lite0", num_classes=3)
    with_bn_statistics(model.net)
    return model.eval()


def _totals(model, composite, x, target):
    result = relevance(model, x, target, composite=composite, layers=STAGES)
    start = result.logits.gather(1, target[:, None])[:, 0]
    totals = {"input": result.input.flatten(1).sum(1), **{s: result.layers[s].sum(1) for s in STAGES}}
    return relative_errors(totals, start)


@pytest.mark.parametrize("weights", ["imagenet", "random"])
def test_relevance_is_conserved_through_every_stage(lite0, lite0_random, weights):
    model = lite0 if weights == "imagenet" else lite0_random
    x = images(2, 96)
    target = model(x).argmax(1)
    errors = _totals(model, make_composite("epsilon_plus_flat", model, zero_params="bias"), x, target)
    assert max(errors.values()) < 1e-3, errors


def test_the_gamma_composite_is_refused_where_it_cannot_conserve(lite0):
    with pytest.raises(ModelError, match=r"epsilon_gamma_box' does not conserve.*epsilon_plus_flat"):
        make_composite("epsilon_gamma_box", lite0)


def _composite_with(model, merge, depthwise_rule, residual=True):
    """Our epsilon_plus_flat rules with one part swapped, to show what that part does."""
    layer_map = [
        (BatchNorm, PassThrough()),
        (Activation, PassThrough()),
        (Sum, NormDirect()),
        (AvgPool, NormDirect()),
        (DepthwiseConvolution, depthwise_rule),
        (nn.Linear, EpsilonDirect(zero_params="bias")),
        (Convolution, ZPlusNonNegative(zero_params="bias")),
    ]
    canonizers = [merge, ResidualBlockCanonizer()] if residual else [merge]
    return LayerMapComposite(layer_map=layer_map, canonizers=canonizers)


def test_each_part_is_needed(lite0):
    x = images(2, 96)
    target = lite0(x).argmax(1)
    ours = _totals(
        lite0, _composite_with(lite0, MergeBatchNormAct(), WSquareDirect(zero_params="bias")), x, target
    )
    assert max(ours.values()) < 1e-3, ours  # the swap harness itself conserves
    zplus = _totals(
        lite0, _composite_with(lite0, MergeBatchNormAct(), ZPlusNonNegative(zero_params="bias")), x, target
    )
    assert zplus["input"] > 0.3, zplus  # z+ on depthwise kernels drops the relevance of all-negative kernels
    # zennit's own merge never reaches timm's BatchNormAct2d (not a leaf): no BatchNorm is merged
    merged = MergeBatchNormAct().apply(lite0.net)
    stock = SequentialMergeBatchNorm().apply(lite0.net)
    try:
        assert len(merged) == 1 + 2 * 1 + 3 * 15 + 1 and not stock  # stem, 1 separable, 15 inverted, head
    finally:
        for instance in (*merged, *stock):
            instance.remove()


def test_the_model_is_restored_and_canonizing_keeps_its_function(lite0):
    x = images(2, 96)
    params = {name: p for name, p in lite0.named_parameters()}
    values = {name: p.detach().clone() for name, p in params.items()}
    with torch.no_grad():
        before = lite0(x)
    lite0.train()
    result = relevance(lite0, x, 0, layers=["net.blocks.4"])
    assert lite0.training and all(m.training for m in lite0.modules())
    lite0.eval()
    torch.testing.assert_close(result.logits, before, rtol=1e-3, atol=1e-4)  # canonized = plain function
    assert all(p is params[n] and torch.equal(p, values[n]) for n, p in lite0.named_parameters())
    with torch.no_grad():
        assert torch.equal(lite0(x), before)


def test_blocks_with_a_gate_or_another_activation_are_refused():
    se = timm.create_model("efficientnet_b0", num_classes=2).eval()
    with pytest.raises(
        ModelError,
        match=r"DepthwiseSeparableConv 'blocks\.0\.0' has a squeeze-excitation gate.*efficientnet_lite0",
    ):
        relevance(se, images(1, 64), 0)
    silu = timm.create_model("efficientnet_lite0", num_classes=2, act_layer=nn.SiLU).eval()
    with pytest.raises(ModelError, match=r"uses SiLU, which has no LRP rule"):
        relevance(silu, images(1, 64), 0)


def _input_error_without_guard(model, composite, x):
    """Relative error of the input relevance total, computed by zennit directly: :func:`relevance` would
    refuse a model whose residual adds are left as a plain ``+``, which is what this measures."""
    x = x.clone().requires_grad_(True)
    composite.register(model)
    try:
        logits = model(x)
        start = torch.zeros_like(logits).scatter_(1, logits.argmax(1, keepdim=True), 1) * logits.detach()
        (grad,) = torch.autograd.grad(logits, x, start)
    finally:
        composite.remove()
    return relative_errors({"input": grad.flatten(1).sum(1)}, start.sum(1))["input"]


def test_uncanonized_residual_adds_multiply_the_relevance_and_are_refused(lite0_random, monkeypatch):
    model, x = lite0_random, images(2, 64)
    canonized = _composite_with(model, MergeBatchNormAct(), WSquareDirect(zero_params="bias"))
    plain_add = _composite_with(model, MergeBatchNormAct(), WSquareDirect(zero_params="bias"), residual=False)
    # control: the same harness conserves (measured 4e-4)
    assert _input_error_without_guard(model, canonized, x) < 1e-2
    # a plain `+` hands the full relevance to both branches: x2 at each of lite0's 9 skip blocks (measured 511)
    assert _input_error_without_guard(model, plain_add, x) > 10
    # with the blocks unknown to the canonizer, relevance() refuses instead of returning such numbers
    monkeypatch.delitem(canonizers_module._BLOCKS, InvertedResidual)
    monkeypatch.delitem(canonizers_module._BLOCKS, DepthwiseSeparableConv)
    with pytest.raises(ModelError, match=r"InvertedResidual 'net\.blocks\.1\.1' combines two activations"):
        relevance(model, x, 0, composite=make_composite("epsilon_plus_flat", model, zero_params="bias"))


def test_canonized_model_computes_the_same_function(lite0_random):
    x = images(2, 64)
    with torch.no_grad():
        before = lite0_random(x)
        composite = LayerMapComposite(layer_map=[], canonizers=canonizers_for(lite0_random))
        composite.register(lite0_random)
        try:
            merged = [
                m for m in lite0_random.modules() if isinstance(m, BatchNormAct2d) and "forward" in vars(m)
            ]
            after = lite0_random(x)
        finally:
            composite.remove()
    assert (
        len(merged) == 49
    )  # every BatchNormAct2d (stem, blocks, head) is merged and runs its activation only
    # measured 3e-6 relative (float32 rounding of the merged weights); a wrong merge is off by O(1)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())


def fresh_lite0() -> nn.Module:
    torch.manual_seed(0)
    return with_bn_statistics(timm.create_model("efficientnet_lite0", num_classes=3), size=64)


def test_the_model_is_left_exactly_as_it_was():
    model, x = fresh_lite0(), images(2, 64)
    with torch.no_grad():
        logits = model(x)
    model.train()
    model.blocks[2].eval()  # a mixed train/eval state must come back as it was
    user_hook = model.blocks[3].register_forward_hook(lambda m, a, out: None)
    try:
        before = snapshot(model)
        result = relevance(model, x, 1, layers=["blocks.4", "blocks.2.1.conv_pwl", "bn2"])
        assert result.input.shape == x.shape
        assert [r.shape for r in result.layers.values()] == [(2, 112), (2, 40), (2, 1280)]
        assert_unchanged(model, before, x, logits)
        with pytest.raises(ShortcutError, match="does not fit"):  # fails after the canonizers are in place
            relevance(model, x, 3, layers=["blocks.4"])
        assert_unchanged(model, before, x, logits)
    finally:
        user_hook.remove()


def test_the_model_is_restored_when_canonizing_fails_half_way():
    model, x = fresh_lite0(), images(1, 32)
    with torch.no_grad():
        logits = model(x)
    composite = make_composite("epsilon_plus_flat", model)  # checked while the model was supported
    model.blocks[3][1].aa = nn.AvgPool2d(1)  # refused when registering, after earlier blocks are canonized
    before = snapshot(model)
    with pytest.raises(ModelError, match=r"InvertedResidual 'blocks\.3\.1' uses anti-aliasing AvgPool2d"):
        relevance(model, x, 0, composite=composite, layers=["blocks.1"])
    assert_unchanged(model, before, x, logits)


def _set(path: str, module: nn.Module):
    def change(model: nn.Module) -> None:
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, module)

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set("bn1.act", nn.SiLU()), r"BatchNormAct2d 'bn1' uses SiLU.*efficientnet_lite0"),  # stem
        (_set("bn2.act", nn.Hardswish()), r"BatchNormAct2d 'bn2' uses Hardswish.*efficientnet_lite0"),  # head
        (
            _set("blocks.2.1.aa", nn.AvgPool2d(1)),
            r"'blocks\.2\.1' uses anti-aliasing AvgPool2d.*efficientnet_lite0",
        ),
        (
            _set("blocks.2.1.extra", nn.Identity()),
            r"'blocks\.2\.1' has parts \['extra'\].*efficientnet_canonizers\.py",
        ),
    ],
    ids=["stem-silu", "head-hardswish", "anti-aliasing", "unknown-child"],
)
def test_unsupported_parts_are_refused(change, message):
    model = timm.create_model("efficientnet_lite0", num_classes=2).eval()
    change(model)
    with pytest.raises(ModelError, match=message):
        relevance(model, images(1, 32), 0)


def test_fast_rules_give_zennits_relevance(lite0_random):
    """Our rules (signed z+ as one stacked convolution, WSquare and Flat from one image of ones, merged
    BatchNormAct2d run without a graph) against zennit's own rules with the same canonizers."""
    model, x = lite0_random, images(3, 64)
    layer_map = [
        (BatchNorm, Pass()),
        (Activation, Pass()),
        (Sum, Norm()),
        (AvgPool, Norm()),
        (DepthwiseConvolution, WSquare()),
        (nn.Linear, Epsilon()),
        (Convolution, ZPlus()),
    ]
    stock = SpecialFirstLayerMapComposite(
        layer_map=layer_map,
        first_map=[(Convolution, Flat())],
        canonizers=canonizers_for(model, sum_module=True),
    )
    ours = relevance(model, x, 2, "epsilon_plus_flat", ["net.blocks.4"])
    theirs = relevance(model, x, 2, stock, ["net.blocks.4"])
    scale = theirs.input.abs().max()
    assert scale > 0
    assert (ours.input - theirs.input).abs().max() <= 1e-5 * scale  # measured 2e-7
    torch.testing.assert_close(
        ours.layers["net.blocks.4"], theirs.layers["net.blocks.4"], rtol=1e-5, atol=1e-6 * scale
    )
