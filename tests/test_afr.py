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
from shortcut_lightning.methods.dfr.afr_fit import (
    L2_GRID,
    afr_weights,
    fit_afr,
    fit_weighted_head,
    worst_class_accuracy,
)

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


def test_tuning_scores_every_pair_on_held_out_folds_and_refits_the_best_on_all():
    torch.manual_seed(0)
    x, y = torch.randn(40, 4).double(), torch.tensor([0, 1] * 20)
    x[y == 1] += 0.8
    logits, w0, b0 = torch.randn(40, 2), torch.randn(2, 4), torch.zeros(2)
    head = fit_afr(x, logits, y, w0, b0, num_classes=2, gamma_grid=(0.0, 3.0), l2_grid=(1e-2, 1.0), folds=2)
    assert set(head.tuning) == {(g, c) for g in (0.0, 3.0) for c in (1e-2, 1.0)}
    # by hand: the same folds, fit on one, worst-class accuracy on the other, mean of both
    p = torch.softmax(logits.double(), 1).gather(1, y[:, None]).squeeze(1)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    folds = [order[0::2], order[1::2]]
    for (gamma, l2), score in head.tuning.items():
        scores = []
        for fit_rows, held in ((folds[1], folds[0]), (folds[0], folds[1])):
            w = afr_weights(p[fit_rows], y[fit_rows], gamma, 2)
            weight, bias = fit_weighted_head(x[fit_rows], y[fit_rows], w, w0, b0, l2)
            scores.append(worst_class_accuracy((x[held] @ weight.T + bias).argmax(1), y[held]))
        assert score == pytest.approx(sum(scores) / 2)
    best = max(head.tuning, key=lambda k: head.tuning[k])
    assert (head.chosen["gamma"], head.chosen["l2"]) == best and head.c == best[1]
    weight, _ = fit_weighted_head(x, y, afr_weights(p, y, best[0], 2), w0, b0, best[1])
    torch.testing.assert_close(torch.as_tensor(head.weight), weight)


def test_grid_in_worker_processes_gives_the_head_of_one_process():
    torch.manual_seed(1)
    x, y = torch.randn(60, 6).double(), torch.tensor([0, 1, 2] * 20)
    x[:, 0] += y
    logits, w0, b0 = torch.randn(60, 3), torch.randn(3, 6), torch.zeros(3)
    one = fit_afr(x, logits, y, w0, b0, num_classes=3, gamma_grid=(1.0, 4.0), workers=1)
    two = fit_afr(x, logits, y, w0, b0, num_classes=3, gamma_grid=(1.0, 4.0), workers=2)
    assert two.tuning == one.tuning and two.chosen == one.chosen
    torch.testing.assert_close(torch.as_tensor(two.weight), torch.as_tensor(one.weight), rtol=0, atol=0)


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
    afr = AutomaticFeatureReweighting(gamma=[1.0, 2.0])
    _, model, _ = _fit(tmp_path, afr)
    report = json.loads((tmp_path / "afr.json").read_text())
    assert report["l2"] in L2_GRID and report["gamma"] in (1.0, 2.0)
    assert set(report["tuning_worst_class_accuracy"]) == {
        f"gamma={g},l2={c}" for g in (1.0, 2.0) for c in L2_GRID
    }
    assert report["uses_annotations"] is False and set(report["after"]) == {"val", "test"}
    head = torch.load(tmp_path / "afr_head.pt")
    torch.testing.assert_close(model.head.weight.detach(), head["weight"].float())
    assert (tmp_path / "checkpoints" / "afr.ckpt").is_file()


def test_bad_input_names_the_field(tmp_path):
    with pytest.raises(ShortcutError, match="AFR gamma must be one value or a list of values, all >= 0"):
        AutomaticFeatureReweighting(gamma=[2.0, -1.0])
    with pytest.raises(ShortcutError, match="AFR folds must be >= 2"):
        AutomaticFeatureReweighting(folds=1)
    with pytest.raises(ShortcutError, match="AFR workers must be >= 1"):
        AutomaticFeatureReweighting(workers=0)
    with pytest.raises(ShortcutError, match="l2_grid must name at least one strength"):
        AutomaticFeatureReweighting(l2_grid=[])
    with pytest.raises(DataError, match="AFR refit split 'holdout' is not in the data"):
        _fit(tmp_path, AutomaticFeatureReweighting(split="holdout"))


def test_ddp_gives_the_head_of_one_process(tmp_path):
    # no training epoch (one process and two would train other batches): the refit of the same model
    _fit(tmp_path / "one", AutomaticFeatureReweighting(gamma=2.0), epochs=0)
    _fit(tmp_path / "two", AutomaticFeatureReweighting(gamma=2.0), devices=2, epochs=0)
    one, two = (json.loads((tmp_path / d / "afr.json").read_text()) for d in ("one", "two"))
    assert two["l2"] == one["l2"]
    # ranks embed other batch compositions: features agree to float noise, so the fits closely
    heads = [torch.load(tmp_path / d / "afr_head.pt") for d in ("one", "two")]
    torch.testing.assert_close(heads[1]["weight"], heads[0]["weight"], rtol=0, atol=2e-3)
