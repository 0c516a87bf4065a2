"""Every stage on a timm ViT (``test_vit`` at 32 px, 4 px patches: an 8 x 8 token grid), and the ViT configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from shortcut_lightning import ShortcutClassifier
from shortcut_lightning.callbacks import (
    DeepFeatureReweighting,
    MaskPruning,
    NeuronRegularization,
    SpuriousPositiveMining,
    SpuriousScore,
    TokenViews,
)
from shortcut_lightning.methods.prusc.masks import model_masks
from shortcut_lightning.xai import neuron_gradcam

from helpers import make_trainer

VIT = {"backbone": "test_vit", "backbone_kwargs": {"img_size": 32, "patch_size": 4}}
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _vit() -> ShortcutClassifier:
    torch.manual_seed(0)
    return ShortcutClassifier(**VIT)


def test_gradcam_reads_tokens_as_the_patch_grid():
    model = _vit().eval()
    x = torch.randn(2, 3, 32, 32)
    block = model.net.blocks[-1]
    maps = neuron_gradcam(model, x, block, model.head, neurons=torch.arange(5))
    assert maps.maps.shape == (2, 5, 8, 8) and not maps.fast
    # the same Grad-CAM by hand for neuron 3 of sample 0: alpha = mean over patches of dz/dA
    acts = {}
    handle = block.register_forward_hook(lambda m, a, out: acts.setdefault("a", out))
    z = model.features(x[:1])
    handle.remove()
    (grad,) = torch.autograd.grad(z[0, 3], acts["a"])
    patches, g = acts["a"][0, 1:].detach(), grad[0, 1:]
    cam = (g.mean(0) * patches).sum(1).relu().reshape(8, 8)
    torch.testing.assert_close(maps.maps[0, 3], cam, rtol=1e-4, atol=1e-6)


def test_dfr_and_sscore_on_a_vit(tiny_synthetic, tmp_path):
    model = _vit()
    dfr = DeepFeatureReweighting(split="val", num_refits=2)
    sscore = SpuriousScore(split="train", n_samples=8, alpha=0.5)
    trainer = make_trainer(tmp_path, [dfr, sscore], limit_val_batches=0)
    trainer.fit(model, datamodule=tiny_synthetic(spurious="patch"))
    report = json.loads((tmp_path / "sscore.json").read_text())
    # the last block's norm1: at the block's output only the class token has a gradient (all maps zero)
    assert report["layer"] == "net.blocks.5.norm1" and report["n_neurons"] == model.head.in_features
    assert 0 < report["mean"] <= 1
    assert (tmp_path / "dfr.json").exists()


def test_score_mining_and_regularization_on_a_vit(tiny_synthetic, tmp_path):
    model = _vit()
    mining = SpuriousPositiveMining(start_epoch=1, top_m=8, num_selected=3, num_neurons=4, report_splits=())
    regularization = NeuronRegularization(start_epoch=1, strength=1.0)
    trainer = make_trainer(tmp_path, [mining, regularization], max_epochs=2, limit_val_batches=0)
    trainer.fit(model, datamodule=tiny_synthetic())
    report = json.loads((tmp_path / "mining.json").read_text())
    assert report["layer"] == "net.blocks.5.norm1"
    neurons = report["neurons"]
    assert neurons and max(neurons) < model.head.in_features
    assert regularization.neurons == neurons


def test_prusc_masks_the_linear_weights_of_a_vit(tiny_synthetic, tmp_path):
    model = _vit()
    pruning = MaskPruning(
        prune_epochs=1, num_clusters=4, modules=["net.blocks.*"], report_splits=(), export=False
    )
    trainer = make_trainer(tmp_path, [pruning], max_epochs=2, limit_val_batches=0)
    trainer.fit(model, datamodule=tiny_synthetic())
    masked = sorted(model_masks(model))
    assert masked and all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in masked)
    assert "net.blocks.0.attn.qkv" in masked and "net.blocks.5.mlp.fc2" in masked


def test_token_views_write_figures(tiny_synthetic, tmp_path):
    views = TokenViews(num_samples=2, query=[3, 4])
    trainer = make_trainer(tmp_path, [views], limit_train_batches=1)
    trainer.fit(_vit(), datamodule=tiny_synthetic())
    assert len(views.written) == 2 and all(Path(p).stat().st_size > 0 for p in views.written)
    with pytest.raises(Exception, match="query must be 'cls' or"):
        TokenViews(query=[1])


@pytest.mark.parametrize("name", ["dfr", "score", "prusc", "sscore_dfr", "token_views"])
def test_vit_configs_name_a_vit_and_existing_callbacks(name):
    """Each stage file of configs/synthetic_vit/ goes on top of its erm.yaml, which names a ViT; no stage file
    changes the backbone, and each names callbacks of the library."""
    erm = yaml.safe_load((CONFIGS / "synthetic_vit" / "erm.yaml").read_text())
    assert erm["model"]["backbone"].startswith("vit_")
    stage = yaml.safe_load((CONFIGS / "synthetic_vit" / f"{name}.yaml").read_text())
    assert "backbone" not in (stage.get("model") or {})
    import shortcut_lightning.callbacks as callbacks

    assert stage["trainer"]["callbacks+"]
    for callback in stage["trainer"]["callbacks+"]:
        assert hasattr(callbacks, callback["class_path"].rsplit(".", 1)[1])
