"""LRP on timm's EfficientNet-Lite: residual adds, BatchNormAct merging and depthwise convolutions.

Conservation as in tests/test_lrp.py: with biases left out of the rules, the relevance summed at every
stage's output and at the input equals the target logit (measured ~1e-4 relative on the ImageNet
weights; the tests allow 1e-3). Each part of the canonizer is switched off once to show the test can
fail: without the residual canonizer LRP is refused; zennit's own BatchNorm merge leaves timm's
BatchNormAct2d unmerged; the z+ rule on depthwise convolutions loses most of the relevance.
"""

from __future__ import annotations

import pytest
import timm
import torch
from test_lrp import images, relative_errors, with_bn_statistics
from torch import nn
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import LayerMapComposite
from zennit.layer import Sum
from zennit.types import Activation, AvgPool, BatchNorm, Convolution

from shortcut_lightning import ModelError, ShortcutClassifier
from shortcut_lightning.xai import ResidualBlockCanonizer, make_composite, relevance
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


def _composite_with(model, merge, depthwise_rule):
    """Our epsilon_plus_flat rules with one part swapped, to show what that part does."""
    layer_map = [
        (BatchNorm, PassThrough()), (Activation, PassThrough()), (Sum, NormDirect()), (AvgPool, NormDirect()),
        (DepthwiseConvolution, depthwise_rule), (nn.Linear, EpsilonDirect(zero_params="bias")),
        (Convolution, ZPlusNonNegative(zero_params="bias")),
    ]  # fmt: skip
    return LayerMapComposite(layer_map=layer_map, canonizers=[merge, ResidualBlockCanonizer()])


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
