"""Callbacks under Lightning DDP (2 CPU processes, gloo, ddp_spawn) give what one process gives."""

from __future__ import annotations

import json

import lightning as L
import torch

from shortcut_lightning import DeepFeatureReweighting, GroupMetrics, ShortcutClassifier, SyntheticShortcuts


def _validate(tmp_path, devices: int) -> dict:
    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet")
    # n_val is odd: ranks get uneven shards, and no sample may be counted twice
    dm = SyntheticShortcuts(n_train=32, n_val=37, n_test=8, image_size=32, batch_size=8)
    kwargs = {"strategy": "ddp_spawn"} if devices > 1 else {}
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, default_root_dir=tmp_path, logger=False,
        enable_progress_bar=False, callbacks=[GroupMetrics(print_table=False)], **kwargs,
    )  # fmt: skip
    trainer.validate(model, datamodule=dm)
    return json.loads((tmp_path / "metrics.json").read_text())


def test_group_metrics_ddp_equals_single_process(tmp_path):
    single = _validate(tmp_path / "one", devices=1)
    double = _validate(tmp_path / "two", devices=2)
    assert sum(g["n"] for g in double["groups"].values()) == 37
    assert double == single


def _dfr(tmp_path, devices: int) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet")
    dm = SyntheticShortcuts(n_train=64, n_val=37, n_test=21, image_size=32, batch_size=8)
    kwargs = {"strategy": "ddp_spawn"} if devices > 1 else {}
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        callbacks=[DeepFeatureReweighting(num_refits=3)], **kwargs,
    )  # fmt: skip
    trainer.validate(model, datamodule=dm)
    return json.loads((tmp_path / "dfr.json").read_text()), torch.load(tmp_path / "dfr_head.pt")


def test_dfr_ddp_gives_the_same_head_as_one_process(tmp_path):
    report_1, head_1 = _dfr(tmp_path / "one", devices=1)
    report_2, head_2 = _dfr(tmp_path / "two", devices=2)
    assert report_2["c"] == report_1["c"]
    for key in ("before", "after"):
        assert report_2[key] == report_1[key]
    # ranks embed other batch compositions: features agree to float noise, so the fits to ~1e-4
    torch.testing.assert_close(head_2, head_1, rtol=0, atol=2e-3)


def _mine(tmp_path, devices: int) -> dict:
    from shortcut_lightning.callbacks import SpuriousPositiveMining

    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet")
    dm = SyntheticShortcuts(n_train=48, n_val=9, n_test=9, image_size=32, batch_size=8, spurious="patch")
    mining = SpuriousPositiveMining(top_m=6, num_selected=3, n_confusers=3, num_neurons=4, report_splits=())
    kwargs = {"strategy": "ddp_spawn"} if devices > 1 else {}
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, max_epochs=1, limit_train_batches=1, limit_val_batches=0,
        default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        callbacks=[mining], **kwargs,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    return json.loads((tmp_path / "mining.json").read_text())


def test_mining_ddp_selects_what_one_process_selects(tmp_path):
    single = _mine(tmp_path / "one", devices=1)
    double = _mine(tmp_path / "two", devices=2)
    assert single["neurons"] and double["neurons"] == single["neurons"]
    for name, entry in single["classes"].items():
        for key in ("top_indices", "selected_indices", "neurons"):
            assert double["classes"][name][key] == entry[key]
