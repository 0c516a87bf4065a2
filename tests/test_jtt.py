"""JTT: the error set is exactly what the identification model gets wrong; the sampler up-weights it."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from shortcut_lightning import JustTrainTwice, ShortcutClassifier, SyntheticShortcuts
from shortcut_lightning.errors import ShortcutError

from helpers import BatchIndices, make_trainer


def _data(**kwargs) -> SyntheticShortcuts:
    return SyntheticShortcuts(
        **{"n_train": 96, "n_val": 16, "n_test": 16, "image_size": 32, "batch_size": 16, **kwargs}
    )


class _Misclassified(L.Callback):
    """After JTT (later in the list): the training samples the model misclassifies, by a plain loop."""

    def __init__(self) -> None:
        self.wrong: dict[int, list[int]] = {}
        self.sampler_weights: dict[int, torch.Tensor] = {}
        self.sampler_repeats: dict[int, torch.Tensor | None] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        sampler = trainer.train_dataloader.sampler
        self.sampler_weights[trainer.current_epoch] = (
            None if sampler.weights is None else sampler.weights.clone()
        )
        multiset = sampler.multiset
        self.sampler_repeats[trainer.current_epoch] = (
            None if multiset is None else torch.bincount(multiset, minlength=len(sampler.dataset))
        )

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        was = pl_module.training
        pl_module.eval()
        wrong = []
        with torch.no_grad():
            for batch in trainer.datamodule.dataloader("train"):
                pred = pl_module(batch["image"]).argmax(1)
                wrong += batch["index"][pred != batch["target"]].tolist()
        pl_module.train(was)
        self.wrong[trainer.current_epoch] = sorted(wrong)


def test_error_set_is_the_misclassified_training_samples_and_is_upweighted(tmp_path):
    torch.manual_seed(0)
    jtt, spy = JustTrainTwice(identify_epochs=1, upweight=7.0, draw="reweight"), _Misclassified()
    make_trainer(tmp_path, [jtt, spy], max_epochs=2).fit(
        ShortcutClassifier("test_resnet"), datamodule=_data()
    )
    assert sorted(jtt.errors.tolist()) == spy.wrong[0] and len(spy.wrong[0]) > 0
    assert spy.sampler_weights[0] is None  # plain shuffling while identifying
    weights = spy.sampler_weights[1]
    assert set(weights[jtt.errors].tolist()) == {7.0}
    assert weights.sum().item() == pytest.approx(96 + 6 * len(jtt.errors))
    report = json.loads((tmp_path / "jtt.json").read_text())
    assert report["error_indices"] == jtt.errors.tolist() and report["uses_annotations"] is False
    assert sum(report["error_groups_for_analysis"].values()) == report["n_errors"] == len(jtt.errors)


def test_upsample_holds_each_error_sample_upweight_times_in_a_longer_epoch(tmp_path):
    """The paper's draw: after identification an epoch is the split plus (upweight - 1) copies of the error set."""
    torch.manual_seed(0)
    jtt, drawn = JustTrainTwice(identify_epochs=1, upweight=4, draw="upsample"), BatchIndices()
    trainer = make_trainer(tmp_path, [jtt, drawn], max_epochs=2, reload_dataloaders_every_n_epochs=1)
    trainer.fit(ShortcutClassifier("test_resnet"), datamodule=_data())
    counts = torch.bincount(torch.tensor(drawn.drawn[1]), minlength=96)
    expected = torch.ones(96, dtype=torch.long)
    expected[jtt.errors] = 4
    assert len(jtt.errors) > 0 and sorted(drawn.drawn[0]) == list(range(96))  # identification: plain epoch
    total = 96 + 3 * len(jtt.errors)
    lone = total % 16 == 1  # a last batch of one sample is dropped (BatchNorm)
    assert trainer.num_training_batches == total // 16 + (total % 16 > 1)
    # every sample exactly its count (no draw with replacement), but for a dropped lone one
    assert (counts <= expected).all() and expected.sum() - counts.sum() == int(lone)


@pytest.mark.parametrize("draw", ["reweight", "upsample"])
def test_identify_epochs_zero_uses_the_loaded_model_and_resume_keeps_the_set(tmp_path, draw):
    torch.manual_seed(0)
    jtt = JustTrainTwice(identify_epochs=0, upweight=3.0, draw=draw)
    trainer = make_trainer(tmp_path, [jtt], max_epochs=1, enable_checkpointing=True)
    trainer.fit(ShortcutClassifier("test_resnet"), datamodule=_data())
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    again, spy = JustTrainTwice(identify_epochs=0, upweight=3.0, draw=draw), _Misclassified()
    again.identify = lambda *a: pytest.fail("identified again after resume")
    make_trainer(tmp_path / "resumed", [again, spy], max_epochs=2).fit(
        ShortcutClassifier("test_resnet"), datamodule=_data(), ckpt_path=ckpt
    )
    assert torch.equal(again.errors, jtt.errors)
    if draw == "reweight":  # the resumed loader draws as before
        assert set(spy.sampler_weights[1][jtt.errors].tolist()) == {3.0}
    else:  # the resumed loader is built upsampled
        repeats = spy.sampler_repeats[1]
        assert set(repeats[jtt.errors].tolist()) == {3} and repeats.sum() == 96 + 2 * len(jtt.errors)


def test_bad_input_names_the_field(tmp_path):
    with pytest.raises(ShortcutError, match="upweight must be > 0"):
        JustTrainTwice(upweight=0)
    with pytest.raises(ShortcutError, match="identify_epochs must be >= 0"):
        JustTrainTwice(identify_epochs=-1)
    with pytest.raises(ShortcutError, match="draw 'copy' is unknown"):
        JustTrainTwice(draw="copy")
    with pytest.raises(ShortcutError, match="upweight must be a whole number"):
        JustTrainTwice(upweight=2.5, draw="upsample")
    with pytest.raises(ShortcutError, match="reload_dataloaders_every_n_epochs: 1"):
        make_trainer(
            tmp_path, [JustTrainTwice(identify_epochs=1)], max_epochs=2
        ).fit(  # upsample: the default
            ShortcutClassifier("test_resnet"), datamodule=_data()
        )
    with pytest.raises(ShortcutError, match="identify_epochs=3 leaves no up-weighted epoch in max_epochs=3"):
        make_trainer(tmp_path, [JustTrainTwice(identify_epochs=3)], max_epochs=3).fit(
            ShortcutClassifier("test_resnet"), datamodule=_data()
        )


class _ErrorDump(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer, pl_module) -> None:
        jtt = next(cb for cb in trainer.callbacks if isinstance(cb, JustTrainTwice))
        with open(f"{self.path}/rank{trainer.global_rank}.json", "w") as f:
            json.dump(jtt.errors.tolist(), f)


def test_ddp_gives_every_rank_the_error_set_of_one_process(tmp_path):
    """Identification from the loaded model (identify_epochs 0): two ranks and one process agree."""
    sets = {}
    for devices in (1, 2):
        root = tmp_path / str(devices)
        root.mkdir()
        torch.manual_seed(0)
        ddp = {"strategy": "ddp_spawn", "devices": 2} if devices > 1 else {}
        trainer = make_trainer(
            root,
            [JustTrainTwice(identify_epochs=0), _ErrorDump(str(root))],
            limit_train_batches=1,
            limit_val_batches=0,
            **ddp,
        )
        trainer.fit(ShortcutClassifier("test_resnet"), datamodule=_data(n_train=37))
        sets[devices] = {p.name: json.loads(p.read_text()) for p in root.glob("rank*.json")}
    assert sets[2]["rank0.json"] == sets[2]["rank1.json"] == sets[1]["rank0.json"]
    assert sets[1]["rank0.json"]  # an untrained model gets some wrong
