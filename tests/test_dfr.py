"""DFR: exactness against a scikit-learn pipeline, the callback on ours and foreign modules, bad input."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import sklearn
import torch
from packaging.version import Version
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from shortcut_lightning import DeepFeatureReweighting, GroupMetrics, ShortcutClassifier
from shortcut_lightning.errors import DataError, ModelError, ShortcutError
from shortcut_lightning.methods.dfr.last_layer import C_GRID, fit_dfr
from shortcut_lightning.probing.model_parts import find_head

from helpers import NoGroupSynthetic, PlainResNet


def _embeddings(seed: int, n: int, d: int, num_classes: int):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    a = (rng.random(n) < np.where(y == 0, 0.2, 0.7)).astype(int)  # spurious attribute correlated with y
    g = y * 2 + a
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, d) + rng.normal(size=d)
    x[:, 0] += 1.5 * y
    x[:, 1] += 3.0 * a
    return x, y, g


def _l1(c, seed, y):
    new = Version(sklearn.__version__) >= Version("1.8")
    lr = LogisticRegression(
        C=c, solver="liblinear", random_state=seed, **({"l1_ratio": 1.0} if new else {"penalty": "l1"})
    )
    return lr if len(np.unique(y)) <= 2 else OneVsRestClassifier(lr)


def _reference_protocol(x, y, g, x_scaler, x_test, seed, num_refits):
    """The DFR protocol written directly with scikit-learn (same random draws, in the same order)."""
    rng = np.random.default_rng(seed)

    def balanced(labels):
        rows = [rng.permutation(np.flatnonzero(labels == v)) for v in np.unique(labels)]
        m = min(len(r) for r in rows)
        return np.sort(np.concatenate([r[:m] for r in rows]))

    order = rng.permutation(len(x))
    held, train = order[: len(x) // 2], order[len(x) // 2 :]
    train = train[balanced(g[train])]
    best, best_wga = None, -1.0
    for c in C_GRID:
        pipe = make_pipeline(StandardScaler(), _l1(c, seed, y))
        pred = pipe.fit(x[train], y[train]).predict(x[held])
        wga = min((pred[g[held] == v] == y[held][g[held] == v]).mean() for v in np.unique(g[held]))
        if wga > best_wga:
            best, best_wga = c, wga
    scaler = StandardScaler().fit(x_scaler)
    scores = []
    for _ in range(num_refits):
        rows = balanced(g)
        lr = _l1(best, seed, y)
        lr.fit(scaler.transform(x[rows]), y[rows])
        scores.append(lr.decision_function(scaler.transform(x_test)))
    mean = np.mean(scores, axis=0)
    pred = (mean > 0).astype(int) if mean.ndim == 1 else mean.argmax(1)
    return best, pred


@pytest.mark.parametrize("num_classes,seed", [(2, 0), (2, 1), (3, 2)])
def test_refit_head_predicts_like_the_sklearn_protocol(num_classes, seed):
    x, y, g = _embeddings(seed, 600, 24, num_classes)
    x_train, _, _ = _embeddings(seed + 10, 900, 24, num_classes)
    x_test, _, _ = _embeddings(seed + 20, 500, 24, num_classes)
    head = fit_dfr(x, y, g, x_train, num_classes, num_refits=7, seed=seed)
    c, want = _reference_protocol(x, y, g, x_train, x_test, seed, num_refits=7)
    assert head.c == c
    assert head.weight.shape == (num_classes, 24)
    np.testing.assert_array_equal(head.predict(x_test), want)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_fits_in_worker_processes_give_the_head_of_one_process(num_classes):
    # liblinear shuffles with the global rand(): threads would interleave its draws, processes must not
    x, y, g = _embeddings(3, 600, 24, num_classes)
    one = fit_dfr(x, y, g, x, num_classes, num_refits=6, seed=3, workers=1)
    two = fit_dfr(x, y, g, x, num_classes, num_refits=6, seed=3, workers=2)
    assert two.c == one.c and two.tuning == one.tuning
    np.testing.assert_array_equal(two.weight, one.weight)
    np.testing.assert_array_equal(two.bias, one.bias)


def _fit(dm, model, callbacks, tmp_path, epochs=1):
    trainer = L.Trainer(
        max_epochs=epochs,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=callbacks,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule=dm)
    return trainer


def test_callback_rewrites_the_head_and_reports(tiny_synthetic, tmp_path):
    L.seed_everything(0)
    dm, model = tiny_synthetic(), ShortcutClassifier("test_resnet")
    dfr = DeepFeatureReweighting(num_refits=3)
    trainer = _fit(dm, model, [GroupMetrics(print_table=False), dfr], tmp_path)
    report = json.loads((tmp_path / "dfr.json").read_text())
    assert report["c"] in C_GRID and 0.0 <= report["head_zero_fraction"] <= 1.0
    assert set(report["before"]) == {"val", "test"} == set(report["after"])
    head = torch.load(tmp_path / "dfr_head.pt")
    torch.testing.assert_close(model.head.weight.detach(), head["weight"].float())
    assert (tmp_path / "checkpoints" / "dfr.ckpt").is_file()
    saved = torch.load(tmp_path / "checkpoints" / "dfr.ckpt", weights_only=False)["callbacks"]
    resumed = DeepFeatureReweighting(num_refits=3)  # a resumed run's stage keeps its "before" reports
    resumed.load_state_dict(next(v for k, v in saved.items() if k.startswith("DeepFeatureReweighting")))
    assert resumed.before_reports == dfr.before_reports and set(resumed.before_reports) == {"val", "test"}
    trainer.test(model, datamodule=dm)  # the in-memory refit model is not refit twice
    tested = json.loads((tmp_path / "metrics.json").read_text())
    assert tested["groups"] == report["after"]["test"]["groups"]


def test_callback_on_a_foreign_module(tiny_synthetic, tmp_path):
    L.seed_everything(0)
    model = PlainResNet()
    before = model.net.fc.weight.detach().clone()
    dfr = DeepFeatureReweighting(num_refits=2, balance="classes")
    _fit(tiny_synthetic(), model, [dfr], tmp_path)
    assert not torch.allclose(before, model.net.fc.weight)
    assert dfr.result["balance"] == "classes"


def test_validate_refits_a_loaded_checkpoint(tiny_synthetic, tmp_path):
    L.seed_everything(0)
    dm, model = tiny_synthetic(), ShortcutClassifier("test_resnet")
    ckpt = tmp_path / "erm.ckpt"
    _fit(dm, model, [], tmp_path).save_checkpoint(ckpt)
    erm_head = model.head.weight.detach().clone()
    dfr = DeepFeatureReweighting(num_refits=2)
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, callbacks=[dfr])
    trainer.validate(model, datamodule=dm, ckpt_path=str(ckpt))
    assert not torch.allclose(erm_head, model.head.weight)
    assert dfr.result["after"]["val"]["wga"] is not None


def test_group_with_one_sample_is_named(tiny_synthetic, tmp_path):
    for data_seed in range(50):
        dm = tiny_synthetic(n_val=9, data_seed=data_seed)
        counts = dm.group_counts("val")
        if (counts == 1).any():
            break
    lonely = dm.group_names[int((counts == 1).nonzero()[0])]
    model = ShortcutClassifier("test_resnet")
    trainer = L.Trainer(logger=False, enable_progress_bar=False, callbacks=[DeepFeatureReweighting()])
    with pytest.raises(DataError, match=rf"group '{lonely}' has 1 sample in the val split"):
        trainer.validate(model, datamodule=dm)


def test_no_group_labels_suggests_classes(tmp_path):
    dm = NoGroupSynthetic(n_train=64, n_val=32, n_test=16, image_size=32, batch_size=16)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, callbacks=[DeepFeatureReweighting()])
    with pytest.raises(DataError, match="balance='classes'"):
        trainer.validate(ShortcutClassifier("test_resnet"), datamodule=dm)


def test_head_that_cannot_be_found_names_the_argument():
    convs_only = torch.nn.Sequential(
        torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    with pytest.raises(ModelError, match=r"DeepFeatureReweighting|head='net.fc'"):
        find_head(convs_only)
    with pytest.raises(ModelError, match="nearest names"):
        find_head(ShortcutClassifier("test_resnet"), "net.fcc")


def test_bad_arguments():
    with pytest.raises(ShortcutError, match="balance"):
        DeepFeatureReweighting(balance="samples")
    with pytest.raises(ShortcutError, match="DFR workers must be >= 1"):
        DeepFeatureReweighting(workers=0)
