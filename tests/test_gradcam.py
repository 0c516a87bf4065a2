"""Grad-CAM per neuron and the s-score: the fast and Jacobian paths against captum, neuron by neuron."""

from __future__ import annotations

import pytest
import timm
import torch
from captum.attr import LayerGradCam

from shortcut_lightning.errors import ModelError
from shortcut_lightning.xai.gradcam import (
    binarize,
    neuron_gradcam,
    score_maps,
    spurious_overlap,
    spurious_scores,
)


def _model():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=2).eval()
    return model


def _features(model):
    return lambda x: model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("layer_name,fast", [("layer4", True), ("layer3", False)])
def test_maps_match_captum_layer_gradcam_neuron_by_neuron(layer_name, fast):
    model = _model()
    x = torch.randn(3, 3, 64, 64)
    layer = getattr(model, layer_name)
    neurons = torch.tensor([0, 5, 17, 100, 511])
    ours = neuron_gradcam(model, x, layer, model.get_classifier(), neurons)
    assert ours.fast is fast
    captum = LayerGradCam(_features(model), layer)
    for k, i in enumerate(neurons.tolist()):
        want = captum.attribute(x, target=i, relu_attributions=True)  # [N, 1, h, w]
        assert (ours.maps[:, k : k + 1] - want.detach()).abs().max() <= 1e-5


def test_scores_match_captum_and_lie_in_unit_interval():
    model = _model()
    x = torch.randn(4, 3, 64, 64)
    masks = torch.zeros(4, 1, 64, 64, dtype=torch.bool)
    masks[:, :, :32] = True
    neurons = torch.arange(0, 512, 37)
    ours = neuron_gradcam(model, x, model.layer4, model.get_classifier(), neurons)
    scores = spurious_scores(ours.maps, masks, alpha=0.5)
    captum = LayerGradCam(_features(model), model.layer4)
    want = torch.stack(
        [
            spurious_scores(captum.attribute(x, target=i, relu_attributions=True).detach(), masks, alpha=0.5)[
                0
            ]
            for i in neurons.tolist()
        ]
    )
    assert (scores - want).abs().max() <= 1e-5
    assert ((scores >= 0) & (scores <= 1)).all()


def test_overlap_counts_the_focus_inside_the_mask():
    binary = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    binary[0, 0, :2, :2] = True  # 4 pixels, 2 inside the top row band
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = True
    overlap = spurious_overlap(binary, mask)
    assert overlap[0, 0] == pytest.approx(0.5) and overlap[0, 1] == 0.0  # empty focus scores 0


def test_a_uniform_map_scores_the_mask_share_and_covers_the_whole_image():
    maps = torch.zeros(2, 2, 2, 2)
    maps[:, 0] = 1.0  # neuron 0 looks everywhere
    maps[:, 1, 0, 0] = 1.0  # neuron 1 looks at the top-left quarter
    masks = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    masks[0, 0, :2, :2] = True  # a quarter of the image
    masks[1, 0, :2] = True  # half of it
    scores, shares = score_maps(maps, masks, alpha=0.5, mode="nearest")
    assert scores.tolist() == pytest.approx([0.375, 1.0]) and shares.tolist() == pytest.approx([1.0, 0.25])
    assert torch.equal(scores, spurious_scores(maps, masks, alpha=0.5, mode="nearest"))


def test_binarize_scales_each_map_and_keeps_empty_maps_empty():
    maps = torch.zeros(1, 2, 2, 2)
    maps[0, 0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = binarize(maps, (2, 2), alpha=0.5, mode="nearest")
    assert b[0, 0].tolist() == [[False, True], [True, True]] and not b[0, 1].any()
    # min-max: 1 -> 0 and 4 -> 1, so alpha 0.5 keeps 3 and 4 only (max scaling kept 2, 3 and 4)
    m = binarize(maps, (2, 2), alpha=0.5, mode="nearest", scaling="minmax")
    assert m[0, 0].tolist() == [[False, False], [True, True]] and not m[0, 1].any()
    flat = binarize(torch.ones(1, 1, 2, 2), (2, 2), alpha=0.5, mode="nearest", scaling="minmax")
    assert not flat.any()  # a constant map has no focus under min-max scaling
    with pytest.raises(ModelError, match="scaling must be one of max, minmax"):
        binarize(maps, (2, 2), alpha=0.5, scaling="peak")


def test_the_three_mean_views_of_the_s_score():
    from shortcut_lightning.methods.sscore.spurious_score import mean_views

    views = mean_views(torch.tensor([0.2, 0.4, 0.6]), torch.tensor([True, False, True]))
    assert views == pytest.approx({"all": 0.4, "head_connected": 0.4, "disconnected_as_zero": 0.8 / 3})
    assert mean_views(torch.tensor([0.5]), torch.tensor([False]))["head_connected"] is None


def test_a_neuron_looking_only_at_the_mask_scores_one():
    """A tiny CNN whose channel 0 copies the masked corner and channel 1 the rest."""

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Identity()
            self.fc = torch.nn.Linear(2, 2)

        def forward(self, x):
            a = self.body(x[:, :2])
            return self.fc(a.mean((2, 3)))

    x = torch.zeros(2, 3, 8, 8)
    x[:, 0, :4, :4] = 1.0  # channel 0 lives in the spurious corner
    x[:, 1, 4:, 4:] = 1.0  # channel 1 lives elsewhere
    masks = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    masks[:, :, :4, :4] = True
    probe = Probe()
    maps = neuron_gradcam(probe, x, probe.body, probe.fc)
    scores = spurious_scores(maps.maps, masks, alpha=0.5, mode="nearest")
    assert maps.fast and scores.tolist() == [1.0, 0.0]
