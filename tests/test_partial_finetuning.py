"""PartialFinetuning: the frozen stages (weights and BatchNorm statistics) stay exactly as they were."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from shortcut_lightning import ShortcutClassifier
from shortcut_lightning.callbacks import PartialFinetuning
from shortcut_lightning.errors import ModelError


def _fit(tiny_synthetic, callback: PartialFinetuning) -> tuple[dict, dict]:
    L.seed_everything(0)
    model = ShortcutClassifier("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[callback],
        accelerator="cpu",
        limit_val_batches=1,
    )
    trainer.fit(model, datamodule=tiny_synthetic())
    return before, model.state_dict()


def _changed(before: dict, after: dict, prefix: str) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))


def test_the_part_before_train_from_stays_exactly_as_it_was(tiny_synthetic):
    before, after = _fit(tiny_synthetic, PartialFinetuning(train_from="net.layer4"))
    assert not _changed(before, after, "net.layer3.")  # weights and running statistics
    assert not _changed(before, after, "net.bn1.")
    assert _changed(before, after, "net.layer4.")
    assert _changed(before, after, "net.fc.")


def test_train_bn_lets_the_frozen_statistics_move(tiny_synthetic):
    before, after = _fit(tiny_synthetic, PartialFinetuning(train_from="net.layer4", train_bn=True))
    assert not _changed(
        before,
        {**after, **{k: before[k] for k in after if "running" in k or "num_batches" in k}},
        "net.layer3.",
    )
    assert not torch.equal(before["net.layer3.0.bn1.running_mean"], after["net.layer3.0.bn1.running_mean"])


def test_an_unknown_module_is_named(tiny_synthetic):
    with pytest.raises(ModelError, match=r"train_from 'net\.layer9' is not a module.*net\.layer"):
        _fit(tiny_synthetic, PartialFinetuning(train_from="net.layer9"))
