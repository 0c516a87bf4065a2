"""BatchNorm re-estimation: exact moments, modes and hooks restored, the stage through the CLI and under DDP."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch import nn

from shortcut_lightning import BatchNormRecalibration, DataError, ShortcutClassifier, SyntheticShortcuts
from shortcut_lightning.batchnorm import recalibrate_batchnorm, whole_split


def _loader(images: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [{"image": images[i : i + batch_size]} for i in range(0, len(images), batch_size)]


@pytest.mark.parametrize("batch_size", [5, 16, 40])
def test_first_layer_gets_the_exact_moments_of_its_inputs_whatever_the_batch_size(batch_size):
    torch.manual_seed(0)
    images = torch.randn(40, 3, 6, 6) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1) + 2.0
    # dropout before the BatchNorm: it must be off during the pass, or the moments are the dropped inputs'
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(108, 2)).train()
    seen = recalibrate_batchnorm(model, _loader(images, batch_size), "test")
    bn = model[1]
    pixels = images.transpose(0, 1).flatten(1).double()
    assert seen == 40
    torch.testing.assert_close(bn.running_mean, pixels.mean(1).float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn.running_var, pixels.var(1).float(), rtol=1e-6, atol=1e-6)
    assert model.training and all(m.training for m in model.modules()), "modes restored"
    assert not bn._forward_pre_hooks, "the moment hooks are removed"


def test_hooks_and_modes_are_restored_when_the_pass_fails():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3, 2)).eval()  # 1x1 images only
    with pytest.raises(RuntimeError):
        recalibrate_batchnorm(model, _loader(torch.randn(4, 3, 2, 2), 2), "test")
    assert not model[0]._forward_pre_hooks and not any(m.training for m in model.modules())


def test_a_model_without_batchnorm_is_left_alone():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    before = [p.clone() for p in model.parameters()]
    assert recalibrate_batchnorm(model, _loader(torch.randn(4, 3, 2, 2), 2), "test") == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_stage_through_the_cli_writes_its_report_and_the_recalibrated_checkpoint(tmp_path):
    from test_cli import TINY_ARGS

    from shortcut_lightning.cli import main

    save_dir = tmp_path / "runs"
    main(
        [
            "fit",
            "--config",
            "configs/synthetic/erm.yaml",
            "--config",
            "configs/synthetic/bn_recalibration.yaml",
            *TINY_ARGS,
            "--trainer.max_epochs",
            "1",
            "--trainer.logger.init_args.save_dir",
            str(save_dir),
        ]
    )
    log_dir = next(save_dir.glob("synthetic_bn_recalibration/version_*"))
    report = json.loads((log_dir / "bn_recalibration.json").read_text())
    assert report["split"] == "train" and report["images"] == 96 and report["layers"] > 0
    assert set(report["before"]) == set(report["after"]) == {"val", "test"}
    assert json.loads((log_dir / "metrics.json").read_text())["wga"] == report["after"]["test"]["wga"]
    # the saved model holds what one more pass over the same images computes, and differs from the last epoch's
    stage = torch.load(log_dir / "checkpoints" / "bn_recalibration.ckpt", weights_only=False)["state_dict"]
    last = ShortcutClassifier.load_from_checkpoint(log_dir / "checkpoints" / "last.ckpt")
    dm = SyntheticShortcuts(n_train=96, n_val=37, n_test=41, batch_size=16)
    dm.setup("fit")
    recalibrate_batchnorm(last, whole_split(dm, "train"), "test")
    keys = [k for k in stage if k.endswith(("running_mean", "running_var"))]
    ours = last.state_dict()
    assert keys and all(torch.allclose(stage[k], ours[k], rtol=1e-4, atol=1e-5) for k in keys)
    trained = torch.load(log_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert any(not torch.allclose(stage[k], trained[k]) for k in keys)


def test_unknown_split_names_the_field():
    dm = SyntheticShortcuts(n_train=16, n_val=8, n_test=8, batch_size=8)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        callbacks=[BatchNormRecalibration(split="holdout")],
    )
    with pytest.raises(DataError, match="split 'holdout' is not in the data"):
        trainer.validate(ShortcutClassifier("test_resnet"), datamodule=dm)


def _recalibrated(tmp_path, devices: int) -> dict[str, torch.Tensor]:
    from helpers import StatisticsSavingBN, make_trainer

    torch.manual_seed(0)
    dm = SyntheticShortcuts(n_train=37, n_val=9, n_test=8, image_size=32, batch_size=8)
    path = tmp_path / "statistics.pt"
    trainer = make_trainer(tmp_path, [StatisticsSavingBN(str(path))], devices=devices)
    trainer.validate(ShortcutClassifier("test_resnet"), datamodule=dm)
    report = json.loads((tmp_path / "bn_recalibration.json").read_text())
    assert report["images"] == 37
    return torch.load(path)


def test_ddp_gives_the_statistics_of_one_process(tmp_path):
    single = _recalibrated(tmp_path / "one", devices=1)
    double = _recalibrated(tmp_path / "two", devices=2)
    assert single.keys() == double.keys()
    for key in single:  # every rank passes the whole split: the one-process statistics, to float noise
        torch.testing.assert_close(double[key], single[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bn_first", [True, False])
def test_two_stages_change_the_model_in_the_order_they_are_listed(tmp_path, bn_first):
    """BatchNorm re-estimation beside DFR (two ModelStages at the end of one fit) runs in list order:
    listed first, DFR refits the head on the re-estimated embedding; listed second, it re-estimates the
    statistics under DFR's refit head. Each stage's "before" report is the other's "after"."""
    from shortcut_lightning import DeepFeatureReweighting

    torch.manual_seed(0)
    dm = SyntheticShortcuts(n_train=48, n_val=32, n_test=24, image_size=32, batch_size=16)
    bn, dfr = BatchNormRecalibration(), DeepFeatureReweighting(num_refits=2, c_grid=[1.0], workers=1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        callbacks=[bn, dfr] if bn_first else [dfr, bn],
    )
    trainer.fit(ShortcutClassifier("test_resnet"), datamodule=dm)
    bn_report = json.loads((tmp_path / "bn_recalibration.json").read_text())
    dfr_report = json.loads((tmp_path / "dfr.json").read_text())
    first, second = (bn_report, dfr_report) if bn_first else (dfr_report, bn_report)
    for split in ("val", "test"):
        assert second["before"][split]["groups"] == first["after"][split]["groups"]
    moved = bn_report["before"]["test"]["groups"] != bn_report["after"]["test"]["groups"]
    refit = dfr_report["before"]["test"]["groups"] != dfr_report["after"]["test"]["groups"]
    assert moved and refit, "a stage that changes nothing would not show the order"
