"""ShortcutClassifier: the timm seam, local weights, the penalty seam and its errors."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from shortcut_lightning import GroupMetrics, ShortcutClassifier
from shortcut_lightning.errors import ModelError

from helpers import GradCapture, SquaredLogitPenalty


def test_features_head_forward_agree():
    model = ShortcutClassifier("test_resnet", num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.features(x)
    assert feats.ndim == 2 and feats.shape[1] == model.head.in_features
    assert torch.allclose(model.head(feats), model(x))
    assert model.head is model.net.get_classifier() and model.head.out_features == 3


def test_default_optimizer_is_the_seeds_sgd():
    opt = ShortcutClassifier("test_resnet").configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)
    assert (
        opt.defaults["lr"] == 1e-3
        and opt.defaults["momentum"] == 0.9
        and opt.defaults["weight_decay"] == 1e-4
    )


def test_unknown_backbone_suggests_names():
    with pytest.raises(ModelError, match=r"unknown backbone 'resnet181'.*resnet18"):
        ShortcutClassifier("resnet181")


def test_a_missing_weights_file_is_named():
    with pytest.raises(ModelError, match="does not exist"):
        ShortcutClassifier("test_resnet", pretrained=True, weights="/nowhere/w.pth")


def test_weights_load_from_a_local_file_and_the_head_is_reset(tmp_path):
    source = ShortcutClassifier("test_resnet", num_classes=1000)
    path = tmp_path / "imagenet.pth"
    torch.save(source.net.state_dict(), path)
    model = ShortcutClassifier("test_resnet", num_classes=2, pretrained=True, weights=str(path))
    conv = next(n for n, p in source.net.named_parameters() if p.ndim == 4)
    assert torch.equal(dict(model.net.named_parameters())[conv], dict(source.net.named_parameters())[conv])
    assert model.head.out_features == 2


def _fit_one_step(tiny_synthetic, callbacks):
    L.seed_everything(0)
    model = ShortcutClassifier("test_resnet")
    trainer = L.Trainer(
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=callbacks,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule=tiny_synthetic())
    return trainer


def test_a_callback_penalty_changes_gradients_and_is_logged(tiny_synthetic):
    plain, with_penalty = GradCapture(), GradCapture()
    _fit_one_step(tiny_synthetic, [plain])
    trainer = _fit_one_step(tiny_synthetic, [SquaredLogitPenalty(5.0), with_penalty])
    assert not torch.allclose(plain.grad, with_penalty.grad)
    assert "train/penalty/probe_step" in trainer.callback_metrics
    assert trainer.callback_metrics["train/penalty/probe_step"] > 0


def test_num_classes_mismatch_is_named(tiny_synthetic):
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, callbacks=[GroupMetrics()])
    with pytest.raises(ModelError, match=r"model.num_classes=3.*has 2 classes"):
        trainer.fit(ShortcutClassifier("test_resnet", num_classes=3), datamodule=tiny_synthetic())
