"""PruSC on the Stage base: its config object, its phases, the one "keep the best" tracker, old state layouts."""

from __future__ import annotations

import inspect
import types
import typing
from dataclasses import fields

import pytest
import torch

from shortcut_lightning.callbacks import MaskPruning
from shortcut_lightning.errors import ShortcutError
from shortcut_lightning.methods.prusc.arguments import PruSCConfig
from shortcut_lightning.methods.prusc.keep_best import IN_MODEL, BestMasks, BestWeights
from shortcut_lightning.methods.prusc.mask_pruning import PruSCPhase
from shortcut_lightning.methods.prusc.masks import attach_masks


def test_the_config_has_every_argument_and_records_them_as_before():
    arguments = [p for p in inspect.signature(MaskPruning.__init__).parameters if p != "self"]
    assert [f.name for f in fields(PruSCConfig)] == arguments  # one source of defaults: the signature
    stage = MaskPruning(groups=[1.0, 2], modules=["net.fc"], report_splits=["val"])
    assert stage.config.groups == [1, 2] and stage.config.report_splits == ("val",)
    recorded = stage.config.parameters()
    assert list(recorded) == [a for a in arguments if a != "report_splits"]
    assert recorded["finetune_split"] == "train" and stage.config.finetune_split is None  # resolved: split's
    assert recorded["groups"] == [1, 2] and stage.uses_annotations and not MaskPruning().uses_annotations


def _choices(annotation) -> tuple:
    """The values a ``Literal[...]`` (or ``Literal[...] | None``) allows; empty for any other type."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return tuple(v for arg in typing.get_args(annotation) for v in _choices(arg))
    return ()


def test_every_literal_field_refuses_a_value_outside_its_set():
    hints = typing.get_type_hints(PruSCConfig)
    literal = {name: _choices(hint) for name, hint in hints.items() if _choices(hint)}
    assert set(literal) == {
        "finetune_split",
        "cluster_within",
        "finetune_keep",
        "mode",
        "split",
        "batchnorm",
        "sparsity",
    }
    for name, allowed in literal.items():
        extra = {"finetune_epochs": 1, "monitor": "val/worst_class"}  # what finetune_split/_keep need
        for value in allowed:
            MaskPruning(**extra, **{name: value})
        with pytest.raises(ShortcutError, match=rf"{name} must be .*got 'other'"):
            MaskPruning(**extra, **{name: "other"})


def test_phases_are_declared_and_undeclared_moves_are_refused():
    assert [p.value for p in MaskPruning.phases] == [
        "waiting",
        "learning",
        "fixed",
    ]  # as checkpoints store them
    stage = MaskPruning()
    assert stage.phase is PruSCPhase.WAITING and stage.waiting
    assert (stage.tested_file, stage.report_file, stage.start_hooks) == (
        "pruned",
        "prusc.json",
        ("fit_start", "epoch_start"),
    )
    with pytest.raises(RuntimeError, match="cannot go from waiting to fixed"):
        stage.enter(PruSCPhase.FIXED)
    stage.enter(PruSCPhase.LEARNING)
    stage.enter(PruSCPhase.FIXED)
    with pytest.raises(RuntimeError, match="cannot go from fixed to learning"):
        stage.enter(PruSCPhase.LEARNING)


def _report() -> dict:
    before = {"val": {"split": "val", "worst_class": 0.5}}
    return {
        "uses_annotations": False,
        "clusters": [],
        "kmeans_inertia": 1.0,
        "before": before,
        "parameters": {},
    }


@pytest.mark.parametrize("older", [False, True])
def test_a_state_saved_before_the_stage_base_loads_and_saves_alike(older):
    """The callback state the code before the Stage base wrote (and, ``older``, before ``statistics`` and
    ``data_split`` existed) loads: its phase, report, kept best and split, and it is saved back with the same keys."""
    logits = {"net.fc": torch.randn(2, 3)}
    saved = {
        "phase": "fixed",
        "started_epoch": 2,
        "clusters": torch.tensor([0, 1, 1]),
        "report": _report(),
        "optimizer": None,
        "best": {"epoch": 3, "score": 0.7, "logits": logits, "statistics": None},
        "best_weights": {"when": "before the stage", "score": 0.5, "state": IN_MODEL},
        "data_split": "val",
    }
    if older:
        del saved["best"]["statistics"], saved["data_split"]
    stage = MaskPruning(monitor="val/worst_class", finetune_epochs=1, finetune_keep="best")
    stage.load_state_dict(saved)
    assert stage.phase is PruSCPhase.FIXED and stage.started_epoch == 2 and stage.best["epoch"] == 3
    assert stage.report.before == _report()["before"] and stage.before_reports["val"]["worst_class"] == 0.5
    state = stage.state_dict()
    assert set(state) == {
        "phase",
        "started_epoch",
        "clusters",
        "report",
        "optimizer",
        "best",
        "best_weights",
        "data_split",
    }
    assert state["phase"] == "fixed" and state["data_split"] == (None if older else "val")
    assert (
        torch.equal(state["best"]["logits"]["net.fc"], logits["net.fc"])
        and state["best"]["statistics"] is None
    )
    assert state["best_weights"] == saved["best_weights"] and state["report"] == _report()


def _masked_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    for mask in attach_masks(model, init_logit=0.5).values():
        mask.set_mode("learn")
    return model


def test_best_masks_keep_the_logits_and_statistics_and_put_them_back_once():
    model = _masked_model()
    keeper = BestMasks("val/worst_class", statistics=True)
    keeper.bind(model)
    keeper.consider(None, 0.6)  # the dense model: every logit init_logit
    state = keeper.state()  # the model's own tensors: markers, no copy
    assert state["logits"] == IN_MODEL and state["statistics"] == IN_MODEL
    keeper.materialise()  # before a step: copied
    stored = keeper.state()["logits"]
    assert stored["0"] == IN_MODEL  # still bit for bit the model's
    with torch.no_grad():
        model[0].parametrizations.weight[0].logits.sub_(1.0)
        model[1].running_mean.add_(1.0)
    stored = keeper.state()
    assert torch.equal(stored["logits"]["0"]["fill"], torch.tensor(0.5))  # a constant: one value and a shape
    assert (
        stored["statistics"]["1.running_mean"]["fill"] == 0
        and stored["statistics"]["1.running_var"] == IN_MODEL
    )
    keeper.consider(1, 0.4)  # worse: nothing changes
    again = BestMasks("val/worst_class", statistics=True)
    again.bind(model)
    again.load(stored)
    assert again.restore() == {"monitor": "val/worst_class", "epoch": None, "score": 0.6}
    assert torch.equal(model[0].parametrizations.weight[0].logits, torch.full((4, 3), 0.5))
    assert torch.equal(model[1].running_mean, torch.zeros(4))
    assert again.state()["logits"] is None and again.restore()["epoch"] is None  # put back once


def test_best_weights_keep_the_whole_state_and_ignore_a_report_without_the_monitor():
    model = _masked_model()
    keeper = BestWeights("val/worst_class", mode="min")
    keeper.bind(model)
    assert keeper.consider_report("before the stage", {"test": {"worst_class": 0.1}}) is None
    assert keeper.best is None
    keeper.consider_report("before the stage", {"val": {"worst_class": 0.3}})
    keeper.materialise()
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[2].parametrizations.weight.original.mul_(2.0)
    keeper.consider("after fine-tuning epoch 4", 0.5)  # min: worse
    assert keeper.restore() == {"monitor": "val/worst_class", "when": "before the stage", "score": 0.3}
    assert all(torch.equal(v, kept[k]) for k, v in model.state_dict().items())
    assert keeper.state()["state"] is None


@pytest.mark.parametrize("kind", [BestMasks, BestWeights])
def test_without_a_monitor_a_tracker_keeps_and_loads_nothing(kind):
    keeper = kind(None)
    keeper.bind(_masked_model())
    keeper.consider(1, 0.9)
    keeper.consider_report(2, {"val": {"worst_class": 0.9}})
    keeper.validated(types.SimpleNamespace(current_epoch=3, callback_metrics={}))
    keeper.load({kind.key: 1, "score": 0.9, **dict.fromkeys(kind.parts, IN_MODEL)})
    assert keeper.best is None and keeper.state() is None and keeper.restore() is None


def test_the_arguments_declared_inert_change_nothing(tmp_path, tiny_synthetic):
    """Without a mask epoch ``mask_lr`` and a positive ``init_logit`` are inert (``PruSCConfig.inert``, which the
    bench's run cache leaves out of its key): the same weights with the defaults and with lr 0 / logit 50."""
    from shortcut_lightning import ShortcutClassifier

    from helpers import make_trainer

    assert MaskPruning(prune_epochs=0, finetune_epochs=1).config.inert() == ("mask_lr", "init_logit")
    assert MaskPruning(prune_epochs=0, finetune_epochs=1, init_logit=-1.0).config.inert() == ("mask_lr",)
    assert MaskPruning(prune_epochs=1).config.inert() == ()
    trained = []
    for settings in ({}, {"mask_lr": 0.0, "init_logit": 50.0}, {"init_logit": -1.0}):
        torch.manual_seed(0)
        model = ShortcutClassifier("test_resnet")
        stage = MaskPruning(prune_epochs=0, finetune_epochs=1, num_clusters=3, report_splits=(), **settings)
        make_trainer(tmp_path, [stage], 1, limit_val_batches=0).fit(model, datamodule=tiny_synthetic())
        trained.append(model.state_dict())
    default, inert, negative = trained
    assert default.keys() == inert.keys()
    assert all(torch.equal(default[k], inert[k]) for k in default)
    assert any(
        not torch.equal(default[k], negative[k]) for k in default
    )  # a negative logit drops every weight
