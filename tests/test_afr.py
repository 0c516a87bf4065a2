"""AFR: the weights against a brute-force loop, the weighted L2-anchored fit, the callback, bad input, DDP."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from shortcut_lightning import (
    AutomaticFeatureReweighting,
    GroupMetrics,
    ShortcutClassifier,
    SyntheticShortcuts,
)
from shortcut_lightning.errors import DataError, ShortcutError
from shortcut_lightning.methods.dfr.afr_fit import L2_GRID, afr_weights, fit_weighted_head

from helpers import make_trainer


def test_weights_match_a_brute_force_loop():
    torch.manual_seed(0)
    p, y = torch.rand(11, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 2, 2, 2, 1, 0, 0, 2])
    got = afr_weights(p, y, gamma=3.0, num_classes=3)
    for i in range(11):
        same = [j for j in range(11) if y[j] == y[i]]
        expected = math.exp(-3.0 * p[i]) / sum(math.exp(-3.0 * p[j]) for j in same) / 3
        assert got[i].item() == pytest.approx(expected, rel=1e-12)
    assert got.sum().item() == pytest.approx(1.0)
    # the worse ERM predicts a sample (lower p), the more it weighs within its class
    zeros = (y == 0).nonzero().flatten()
    assert torch.equal(torch.argsort(got[zeros]), torch.argsort(-p[zeros]))


def test_strong_l2_keeps_the_erm_head_and_none_fits_the_weighted_loss():
    torch.manual_seed(0)
    x, y = torch.randn(60, 5).double(), torch.randint(0, 2, (60,))
    w = torch.full((60,), 1 / 60, dtype=torch.float64)
    w0, b0 = torch.randn(2, 5), torch.zeros(2)
    anchored, _ = fit_weighted_head(x, y, w, w0, b0, l2=1e6)
    torch.testing.assert_close(anchored, w0.double(), atol=1e-4, rtol=0)
    free, bias = fit_weighted_head(x, y, w, w0, b0, l2=0.0)
    # at the optimum of the unregularised weighted cross-entropy the gradient vanishes
    weight = free.clone().requires_grad_(True)
    loss = (w * torch.nn.functional.cross_entropy(x @ weight.T + bias, y, reduction="none")).sum()
    (grad,) = torch.autograd.grad(loss, weight)
    assert grad.abs().max().item() < 1e-4


def _fit(
    tmp_path, afr, devices: int = 1, epochs: int = 1
) -> tuple[L.Trainer, ShortcutClassifier, SyntheticShortcuts]:
    torch.manual_seed(0)
    dm = SyntheticShortcuts(n_train=64, n_val=40, n_test=24, image_size=32, batch_size=16)
    model = ShortcutClassifier("test_resnet")
    kwargs = {"strategy": "ddp_spawn", "devices": devices} if devices > 1 else {}
    trainer = make_trainer(tmp_path, [GroupMetrics(print_table=False), afr], max_epochs=epochs, **kwargs)
    trainer.fit(model, datamodule=dm)
    return trainer, model, dm


def test_callback_rewrites_the_head_and_reports(tmp_path):
    afr = AutomaticFeatureReweighting(gamma=2.0)
    _, model, _ = _fit(tmp_path, afr)
    report = json.loads((tmp_path / "afr.json").read_text())
    assert report["l2"] in L2_GRID and set(report["tuning_worst_class_accuracy"]) == {str(v) for v in L2_GRID}
    assert report["uses_annotations"] is False and set(report["after"]) == {"val", "test"}
    head = torch.load(tmp_path / "afr_head.pt")
    torch.testing.assert_close(model.head.weight.detach(), head["weight"].float())
    assert (tmp_path / "checkpoints" / "afr.ckpt").is_file()


def test_bad_input_names_the_field(tmp_path):
    with pytest.raises(ShortcutError, match="gamma must be >= 0"):
        AutomaticFeatureReweighting(gamma=-1.0)
    with pytest.raises(ShortcutError, match="l2_grid must name at least one strength"):
        AutomaticFeatureReweighting(l2_grid=[])
    with pytest.raises(DataError, match="AFR refit split 'holdout' is not in the data"):
        _fit(tmp_path, AutomaticFeatureReweighting(split="holdout"))


def test_ddp_gives_the_head_of_one_process(tmp_path):
    # no training epoch (one process and two would train other batches): the refit of the same model
    _fit(tmp_path / "one", AutomaticFeatureReweighting(), epochs=0)
    _fit(tmp_path / "two", AutomaticFeatureReweighting(), devices=2, epochs=0)
    one, two = (json.loads((tmp_path / d / "afr.json").read_text()) for d in ("one", "two"))
    assert two["l2"] == one["l2"]
    # ranks embed other batch compositions: features agree to float noise, so the fits closely
    heads = [torch.load(tmp_path / d / "afr_head.pt") for d in ("one", "two")]
    torch.testing.assert_close(heads[1]["weight"], heads[0]["weight"], rtol=0, atol=2e-3)
