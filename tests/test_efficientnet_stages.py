"""Every stage on timm's EfficientNet-Lite (depthwise convolutions, BatchNormAct, ReLU6), on tiny data."""

from __future__ import annotations

import json

import pytest
import torch

from shortcut_lightning import ShortcutClassifier
from shortcut_lightning.callbacks import (
    DeepFeatureReweighting,
    MaskPruning,
    NeuronRegularization,
    SpuriousPositiveMining,
    SpuriousScore,
)
from shortcut_lightning.methods.prusc.masks import model_masks

from helpers import make_trainer

SIZE = {"image_size": 64}  # stride 32: a 2x2 map at the last stage, enough for Grad-CAM to locate


@pytest.fixture
def lite0():
    torch.manual_seed(0)
    return ShortcutClassifier("efficientnet_lite0", num_classes=2)


def test_sscore_finds_the_last_conv_stage_and_scores_every_neuron(tmp_path, tiny_synthetic, lite0):
    scorer = SpuriousScore(n_samples=8, alpha=0.5, prune_above=0.9, report_splits=("val",))
    make_trainer(tmp_path, [scorer], 1, limit_val_batches=1).fit(
        lite0, datamodule=tiny_synthetic(spurious="patch", **SIZE)
    )
    assert scorer.result["layer"] == "net.bn2"  # the BatchNormAct (ReLU6) whose pool is the embedding
    result = scorer.result
    assert result["n_neurons"] == 1280 and sum(result["ranges"].values()) == 1280
    assert 0 <= result["mean"] <= 1
    assert result["mean"] != pytest.approx(result["uniform_map_score"], abs=1e-4)  # the maps are not uniform


def test_prusc_masks_the_depthwise_convolutions_too(tmp_path, tiny_synthetic, lite0):
    pruning = MaskPruning(
        prune_epochs=1,
        num_clusters=3,
        mask_lr=0.5,
        init_logit=1.0,
        lambda_sparse=1e-3,
        report_splits=("val",),
        export=False,
    )
    make_trainer(tmp_path, [pruning], 2, limit_val_batches=0).fit(lite0, datamodule=tiny_synthetic(**SIZE))
    masks = model_masks(lite0)
    depthwise = [n for n in masks if getattr(lite0.get_submodule(n), "groups", 1) > 1]
    assert "net.blocks.1.0.conv_dw" in depthwise and len(depthwise) == 16  # every depthwise conv of lite0
    assert any((masks[n].hard() == 0).any() for n in depthwise), "mask learning pruned no depthwise weight"
    report = json.loads((tmp_path / "prusc.json").read_text())
    assert 0 < report["densities"]["Prune_f"] < 1


def test_dfr_refits_the_head_of_efficientnet(tmp_path, tiny_synthetic, lite0):
    dfr = DeepFeatureReweighting(split="val", num_refits=2, balance="classes", report_splits=("val",))
    before = lite0.head.weight.detach().clone()
    make_trainer(tmp_path, [dfr], 1, limit_val_batches=0).fit(lite0, datamodule=tiny_synthetic(**SIZE))
    assert lite0.head.weight.shape == (2, 1280) and not torch.equal(lite0.head.weight, before)


def test_score_mines_at_a_named_intermediate_stage_and_regularizes_it(tmp_path, tiny_synthetic, lite0):
    mining = SpuriousPositiveMining(
        layer="net.blocks.4",
        top_m=8,
        num_selected=3,
        n_confusers=4,
        num_neurons=4,
        selection="auto",
        report_splits=("val",),
    )
    regularization = NeuronRegularization(strength=0.5, finetune_from="net.blocks.4")
    before = lite0.net.blocks[3][0].conv_pw.weight.detach().clone()
    make_trainer(tmp_path, [mining, regularization], 2, limit_val_batches=1).fit(
        lite0, datamodule=tiny_synthetic(spurious="patch", **SIZE)
    )
    result = json.loads((tmp_path / "mining.json").read_text())
    assert result["layer"] == "net.blocks.4"
    assert result["neurons"] and all(0 <= n < 112 for n in result["neurons"])  # blocks.4 has 112 channels
    assert torch.equal(lite0.net.blocks[3][0].conv_pw.weight, before)  # frozen before net.blocks.4
    assert regularization.neurons == result["neurons"]
