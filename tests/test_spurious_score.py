"""SpuriousScore callback: scores, files, pruning, DDP-free determinism and bad input."""

from __future__ import annotations

import csv
import json

import lightning as L
import pytest
import torch

from shortcut_lightning import ShortcutClassifier, SpuriousScore
from shortcut_lightning.errors import DataError, ModelError

from helpers import PlainResNet, make_trainer


def _trainer(tmp_path, callbacks) -> L.Trainer:
    return make_trainer(tmp_path, callbacks, enable_checkpointing=True)


def test_scores_files_and_pruning(tiny_synthetic, tmp_path):
    torch.manual_seed(0)
    model, dm = ShortcutClassifier("test_resnet"), tiny_synthetic(image_size=64)
    callback = SpuriousScore(n_samples=12, prune_above=0.5)
    _trainer(tmp_path, [callback]).validate(model, datamodule=dm)
    report = json.loads((tmp_path / "sscore.json").read_text())
    assert report["n_samples"] == 12 and report["one_pass"] and report["layer"].startswith("net.")
    rows = list(csv.DictReader((tmp_path / "sscore.csv").open()))
    scores = torch.tensor([float(r["s_score"]) for r in rows])
    assert len(rows) == model.head.in_features and ((scores >= 0) & (scores <= 1)).all()
    assert report["mean"] == pytest.approx(float(scores.mean()), abs=1e-5)
    assert report["views"]["max"]["all"] == pytest.approx(report["mean"])  # the default scaling's view
    assert report["views"]["max"]["head_connected"] == pytest.approx(report["mean_used_neurons"])
    assert set(report["views"]) == {"max", "minmax"}
    shares = torch.tensor([float(r["focus_share"]) for r in rows])
    assert ((shares >= 0) & (shares <= 1)).all() and (shares > 0).any()
    assert report["mean_focus_share"] == pytest.approx(float(shares.mean()), abs=1e-5)
    masks = torch.stack([dm.dataset("train")[i]["mask"] for i in report["sample_index"]]).float()
    assert report["uniform_map_score"] == pytest.approx(float(masks.flatten(1).mean(1).mean()), abs=1e-6)
    assert 0 < report["uniform_map_score"] < 1
    pruned = report["pruning"]["neurons"]
    assert pruned == (scores > 0.5).nonzero().flatten().tolist() and pruned
    assert (model.head.weight[:, pruned] == 0).all()
    assert set(report["pruning"]["after"]) == {"val", "test"}
    assert (tmp_path / "sscore_heatmaps.png").stat().st_size > 1000


def test_same_samples_same_scores(tiny_synthetic, tmp_path):
    torch.manual_seed(0)
    model, dm = ShortcutClassifier("test_resnet"), tiny_synthetic(image_size=64)
    a, b = SpuriousScore(n_samples=8), SpuriousScore(n_samples=8)
    _trainer(tmp_path / "a", [a]).validate(model, datamodule=dm)
    _trainer(tmp_path / "b", [b]).validate(model, datamodule=dm)
    assert a.result["sample_index"] == b.result["sample_index"] and a.result["mean"] == b.result["mean"]


def test_foreign_module_finds_its_pooled_layer(tiny_synthetic, tmp_path):
    callback = SpuriousScore(n_samples=4)
    _trainer(tmp_path, [callback]).validate(PlainResNet(), datamodule=tiny_synthetic(image_size=64))
    assert callback.result["layer"] == "net.layer4" and callback.result["one_pass"]


def test_an_earlier_layer_uses_the_jacobian_path(tiny_synthetic, tmp_path):
    callback = SpuriousScore(n_samples=4, layer="net.layer3")
    _trainer(tmp_path, [callback]).validate(PlainResNet(), datamodule=tiny_synthetic(image_size=64))
    assert not callback.result["one_pass"]


def test_data_without_masks_says_where_masks_come_from(metadata_folder, tmp_path):
    from shortcut_lightning.data import MetadataDataModule

    dm = MetadataDataModule(root=str(metadata_folder(masks=False)), image_size=32, num_workers=0)
    with pytest.raises(DataError, match="mask_filename"):
        _trainer(tmp_path, [SpuriousScore(n_samples=2)]).validate(
            ShortcutClassifier("test_resnet"), datamodule=dm
        )


def test_unknown_layer_lists_nearest_names(tiny_synthetic, tmp_path):
    with pytest.raises(ModelError, match=r"'net.layer9'.*nearest names"):
        _trainer(tmp_path, [SpuriousScore(n_samples=2, layer="net.layer9")]).validate(
            ShortcutClassifier("test_resnet"), datamodule=tiny_synthetic(image_size=64)
        )


def test_a_one_by_one_layer_is_refused(tiny_synthetic, tmp_path):
    dm = tiny_synthetic(image_size=16)  # test_resnet's last block is 1x1 at 16 px
    with pytest.raises(ModelError, match="1x1 map"):
        _trainer(tmp_path, [SpuriousScore(n_samples=2)]).validate(
            ShortcutClassifier("test_resnet"), datamodule=dm
        )
