"""PruSC's ``finetune_keep="best"``: the best validated state of the fine-tuning is the one tested and exported."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from shortcut_lightning import ShortcutClassifier
from shortcut_lightning.callbacks import MaskPruning
from shortcut_lightning.errors import ShortcutError
from shortcut_lightning.methods.prusc.keep_best import IN_MODEL

from helpers import make_trainer


class _Scripted(L.Callback):
    """Logs ``name`` from a script, one value per epoch; keeps the weights each epoch was validated with and the
    MaskPruning state a checkpoint of each epoch would hold."""

    def __init__(self, values, name):
        self.values, self.name, self.weights, self.states = values, name, {}, {}

    def on_validation_epoch_end(self, trainer, pl_module):
        pl_module.log(self.name, self.values[trainer.current_epoch])
        self.weights[trainer.current_epoch] = _weights(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        pruning = next(cb for cb in trainer.callbacks if isinstance(cb, MaskPruning))
        self.states[trainer.current_epoch] = copy.deepcopy(pruning.state_dict())


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith("weight")}


def _fit(tmp_path, tiny_synthetic, script, max_epochs=3, ckpt_path=None, checkpoint=False, **kwargs):
    """1 mask epoch, then 2 fine-tuning epochs; with ``checkpoint`` a ``last.ckpt`` in ``tmp_path / "ck"``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet")
    start = _weights(model)
    pruning = MaskPruning(
        prune_epochs=1, finetune_epochs=2, num_clusters=4, mask_lr=0.5, init_logit=0.5, export=False, **kwargs
    )
    callbacks = [
        script,
        pruning,
        *([ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)] if checkpoint else []),
    ]
    trainer = make_trainer(
        tmp_path,
        callbacks,
        max_epochs,
        limit_val_batches=1,
        limit_train_batches=3,
        enable_checkpointing=checkpoint,
    )
    trainer.fit(model, datamodule=tiny_synthetic(), ckpt_path=ckpt_path)
    return model, pruning, start


def test_best_keeps_the_fine_tuning_epoch_that_validated_best(tmp_path, tiny_synthetic):
    # epoch 0 learns masks; epochs 1 and 2 fine-tune; epoch 1 validates best; the before report lacks the
    # scripted metric, so the fine-tuning epochs alone compete
    script = _Scripted([0.3, 0.9, 0.5], "val/scripted")
    model, pruning, _ = _fit(
        tmp_path, tiny_synthetic, script, monitor="val/scripted", finetune_keep="best", report_splits=()
    )
    assert pruning.report.finetune_best == {
        "monitor": "val/scripted",
        "when": "after fine-tuning epoch 1",
        "score": pytest.approx(0.9),
    }
    now = _weights(model)
    assert any(not torch.equal(script.weights[1][k], script.weights[2][k]) for k in now), "epoch 2 trained"
    assert all(torch.equal(now[k], script.weights[1][k]) for k in now)
    # a checkpoint written during the fine-tuning carries the best state, so a resumed run keeps it: after
    # epoch 1 that state is the model's own (the checkpoint's state_dict), so the callback holds a marker
    saved = script.states[1]["best_weights"]
    assert saved["when"] == "after fine-tuning epoch 1" and saved["state"] == IN_MODEL
    resumed = MaskPruning(finetune_epochs=2, monitor="val/scripted", finetune_keep="best")
    resumed.load_state_dict(script.states[1])
    assert resumed.state_dict()["best_weights"]["score"] == pytest.approx(0.9)
    # once restored the copy leaves the state (it would weigh down every later checkpoint)
    assert pruning.state_dict()["best_weights"]["state"] is None


def test_a_run_killed_while_fine_tuning_resumes_with_its_best_state(tmp_path, tiny_synthetic):
    """The best state found before the kill (epoch 1) is in last.ckpt, and it is the state restored at the end."""
    stage = {"monitor": "val/scripted", "finetune_keep": "best", "report_splits": (), "checkpoint": True}
    killed = _Scripted([0.3, 0.9, 0.5], "val/scripted")
    # stops after fine-tuning epoch 1, its checkpoint written
    _fit(tmp_path, tiny_synthetic, killed, max_epochs=2, **stage)
    # Lightning validates epoch 1 again after the resume: scored low there, so only the checkpointed best
    # (0.9, from before the kill) can make epoch 1's state win over epoch 2's 0.5
    again = _Scripted([0.3, 0.1, 0.5], "val/scripted")
    model, pruning, _ = _fit(
        tmp_path, tiny_synthetic, again, ckpt_path=tmp_path / "ck" / "last.ckpt", **stage
    )
    assert list(again.states) == [2]  # only the last epoch trained after the resume
    assert pruning.report.finetune_best["when"] == "after fine-tuning epoch 1"
    now = _weights(model)
    assert any(not torch.equal(now[k], again.weights[2][k]) for k in now), "epoch 2 trained"
    assert all(torch.equal(now[k], killed.weights[1][k]) for k in now)


@pytest.mark.parametrize("finetune_keep", ["best", "last"])
def test_best_falls_back_to_the_model_before_the_stage(tmp_path, tiny_synthetic, finetune_keep):
    # every epoch of the stage scores below any accuracy: the dense model before it validated better
    script = _Scripted([-1.0, -0.5, -0.2], "val/worst_class")
    model, pruning, start = _fit(
        tmp_path,
        tiny_synthetic,
        script,
        monitor="val/worst_class",
        finetune_keep=finetune_keep,
        report_splits=("val",),
    )
    now = _weights(model)
    if finetune_keep == "last":  # the fine-tuned model, whatever it validated
        assert pruning.report.finetune_best is None
        assert all(torch.equal(now[k], script.weights[2][k]) for k in now)
        assert any(not torch.equal(now[k], start[k]) for k in now)
        return
    dense = pruning.report.before["val"]["worst_class"]
    assert pruning.report.finetune_best == {
        "monitor": "val/worst_class",
        "when": "before the stage",
        "score": pytest.approx(dense),
    }
    assert all(torch.equal(now[k], start[k]) for k in now), "the weights before the stage"
    assert pruning.report.after["val"]["worst_class"] == pytest.approx(dense)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"finetune_keep": "first"}, "finetune_keep must be one of 'last', 'best', got 'first'"),
        ({"finetune_keep": "best", "finetune_epochs": 2}, "finetune_keep 'best' needs a monitor"),
        ({"finetune_keep": "best", "monitor": "val/worst_class"}, "finetune_epochs >= 1, got monitor="),
    ],
)
def test_finetune_keep_bad_values_name_the_field(kwargs, message):
    with pytest.raises(ShortcutError, match=message):
        MaskPruning(**kwargs)
