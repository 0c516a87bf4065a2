"""``predict`` writes every rank's rows once; a NaN loss stops ``fit`` with one line, on every DDP rank."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from test_cli import ROOT, TINY_ARGS, run_cli

from shortcut_lightning import FiniteLoss, ModelError, ShortcutClassifier, SyntheticShortcuts
from shortcut_lightning.cli import main


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_predict_with_two_processes_writes_every_sample_once(tmp_path):
    """Today's CLI wrote rank 0's shard only (under ddp_spawn: no file at all)."""
    one = run_cli(tmp_path / "one", subcommand="predict")  # the same seeded weights in both runs
    two = run_cli(
        tmp_path / "two",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp_spawn",
        subcommand="predict",
    )
    single, double = _rows(one / "predictions.csv"), _rows(two / "predictions.csv")
    assert [int(r["index"]) for r in double] == list(range(41))  # the whole test split, in order, once each
    for a, b in zip(single, double, strict=True):
        assert {k: a[k] for k in ("index", "target", "group", "pred")} == {
            k: b[k] for k in ("index", "target", "group", "pred")
        }
        assert float(a["logit_1"]) == pytest.approx(float(b["logit_1"]), abs=1e-4)


class NanAfter(ShortcutClassifier):
    """The loss turns NaN at ``step`` (on ``rank`` only, or on every rank with ``None``)."""

    def __init__(self, step: int = 2, rank: int | None = None, **kwargs) -> None:
        super().__init__("test_resnet", **kwargs)
        self.nan_step, self.nan_rank = step, rank

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step >= self.nan_step and self.nan_rank in (None, self.global_rank):
            loss = loss * float("nan")
        return loss


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    settings = {
        "max_epochs": 2,
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        **kwargs,
    }
    return L.Trainer(default_root_dir=tmp_path, callbacks=[FiniteLoss()], **settings)


def test_a_nan_loss_stops_the_fit_before_its_backward(tmp_path):
    torch.manual_seed(0)
    model = NanAfter(step=2)
    dm = SyntheticShortcuts(n_train=96, n_val=16, n_test=16, image_size=32, batch_size=16)
    with pytest.raises(ModelError, match=r"not finite \(nan\) at epoch 0, global step 2, batch 2 .*32-true"):
        _trainer(tmp_path).fit(model, datamodule=dm)
    assert all(torch.isfinite(p).all() for p in model.parameters()), "the NaN step reached the weights"


def test_a_nan_loss_on_one_rank_stops_every_rank(tmp_path):
    dm = SyntheticShortcuts(n_train=96, n_val=16, n_test=16, image_size=32, batch_size=16)
    with pytest.raises(Exception, match="not finite") as caught:
        _trainer(tmp_path, devices=2, strategy="ddp_spawn").fit(NanAfter(step=1, rank=1), datamodule=dm)
    # both ranks raise our error (the rank whose loss is finite says another rank's was not)
    assert "ModelError" in str(caught.value) or isinstance(caught.value, ModelError)


def test_the_cli_stops_a_diverging_fit_in_one_line(tmp_path, capsys):
    """Today a learning rate of 1e30 trains on NaN to the end and exits 0."""
    with pytest.raises(SystemExit) as stopped:
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / "synthetic" / "erm.yaml"),
                *TINY_ARGS,
                "--trainer.logger.init_args.save_dir",
                str(tmp_path / "runs"),
                "--trainer.max_epochs",
                "2",
                "--model.optimizer.init_args.lr",
                "1e30",
            ]
        )
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("shortcut: error: the training loss is not finite")
    assert "model.optimizer.init_args.lr" in err[-1] and "32-true" in err[-1]
    assert not list((tmp_path / "runs").glob("*/version_*/metrics.json")), "no test table of a NaN model"
