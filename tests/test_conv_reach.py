"""Which convolution taps can read an image pixel: the geometry against the gradient it predicts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shortcut_lightning import ShortcutClassifier
from shortcut_lightning.methods.prusc.conv_reach import reachable_taps, reachable_weights
from shortcut_lightning.methods.prusc.masks import attach_masks, densities, set_density


def _taps_with_gradient(conv: nn.Module, size: tuple[int, ...]) -> torch.Tensor:
    """Taps whose weight gradient is non-zero for a random input and output gradient."""
    conv.weight.grad = None
    out = conv(torch.rand(3, conv.in_channels, *size) + 0.1)
    (out * torch.randn_like(out)).sum().backward()
    return conv.weight.grad.abs().sum(dim=(0, 1)) > 0


@pytest.mark.parametrize(
    "make, size",
    [
        (lambda: nn.Conv2d(2, 2, 3, padding=1), (1, 1)),
        (lambda: nn.Conv2d(2, 2, 3, padding=4, dilation=4), (4, 4)),
        (lambda: nn.Conv2d(2, 2, 3, padding=2, dilation=2), (4, 4)),
        (lambda: nn.Conv2d(2, 2, 3, padding=1, stride=2), (2, 2)),
        (lambda: nn.Conv2d(2, 2, 7, padding=3, stride=2), (5, 3)),
        (lambda: nn.Conv2d(2, 2, 3, padding="same", dilation=3), (3, 3)),
        (lambda: nn.Conv2d(2, 2, 3, padding="valid"), (4, 5)),
        (lambda: nn.Conv1d(2, 2, 5, padding=4, dilation=2), (3,)),
        (lambda: nn.Conv2d(2, 2, 3, padding=4, dilation=4, padding_mode="reflect"), (5, 5)),
    ],
)
def test_reachable_taps_are_the_taps_that_get_a_gradient(make, size):
    torch.manual_seed(0)
    conv = make()
    assert torch.equal(reachable_taps(conv, size), _taps_with_gradient(conv, size))


def test_a_32px_resnet18_reads_layer4_through_the_centre_tap_only():
    torch.manual_seed(0)
    # zero_init_last off: timm's zero BatchNorm scales would stop every residual branch's gradient
    kwargs = {"output_stride": 8, "zero_init_last": False}
    model = ShortcutClassifier("resnet18", num_classes=2, backbone_kwargs=kwargs)
    model.train()
    running = model.net.bn1.running_mean.clone()
    reach = reachable_weights(model, torch.rand(1, 3, 32, 32))
    # the probe leaves the mode and the statistics as they were
    assert model.training and torch.equal(model.net.bn1.running_mean, running)
    centre = torch.zeros(3, 3, dtype=torch.bool)
    centre[1, 1] = True
    for name in ("net.layer4.0.conv2", "net.layer4.1.conv1", "net.layer4.1.conv2"):
        assert torch.equal(reach[name][0, 0], centre), name
    assert reach["net.conv1"].all() and reach["net.layer3.1.conv2"].all()
    # every conv's reachable taps are exactly those that get a gradient through the whole network
    model.eval()
    out = model(torch.rand(4, 3, 32, 32))
    (out * torch.randn_like(out)).sum().backward()
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            assert torch.equal(reach[name][0, 0], module.weight.grad.abs().sum(dim=(0, 1)) > 0), name


def test_prune_f_reachable_leaves_out_the_weights_that_read_only_padding():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=4, dilation=4), nn.Flatten(), nn.Linear(2 * 16, 2))
    masks = attach_masks(model)
    reach = reachable_weights(model, torch.rand(1, 1, 4, 4))
    with torch.no_grad():  # prune every tap that reads only padding, keep the rest
        masks["0"].logits.copy_(torch.where(reach["0"].expand_as(masks["0"].logits), 3.0, -3.0))
    found = densities(model, reach)
    assert found["0"] == pytest.approx(1 / 9)
    assert found["Prune_f"] == pytest.approx(16 / (18 + 64))  # 16 of the conv's 18 weights, of 82
    assert found["Prune_f_reachable"] == 0
    assert "Prune_f_reachable" not in densities(model)


def test_target_density_counts_the_reachable_weights_and_prunes_the_rest():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=4, dilation=4), nn.Flatten(), nn.Linear(4 * 16, 2))
    masks = attach_masks(model)
    for mask in masks.values():
        torch.nn.init.normal_(mask.logits)
    reach = reachable_weights(model, torch.rand(1, 2, 4, 4))
    set_density(masks, 0.25, reach)
    conv_live = reach["0"].expand_as(masks["0"].logits)
    kept_live = int(masks["0"].hard()[conv_live].sum()) + int(masks["2"].hard().sum())
    assert kept_live == round(0.25 * (int(conv_live.sum()) + masks["2"].logits.numel()))
    assert masks["0"].hard()[~conv_live].sum() == 0  # the taps that read only padding are pruned
    assert densities(model, reach)["Prune_f_reachable"] == pytest.approx(0.75, abs=1e-2)
