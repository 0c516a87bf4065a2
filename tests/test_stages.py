"""The Stage lifecycle: every stage of ``callbacks.__all__`` builds on ``stages.Stage`` and declares its members."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import pytest

from shortcut_lightning import callbacks, stages
from shortcut_lightning.callbacks import (
    DeepFeatureReweighting,
    EmbeddingProjector,
    GroupMetrics,
    JustTrainTwice,
    MaskPruning,
    SpuriousPositiveMining,
    SpuriousScore,
)
from shortcut_lightning.errors import DataError
from shortcut_lightning.stages import ModelStage, OnceStage, Stage, decide_on_rank_zero

# the callbacks that are tools, not stages (they change nothing a stage changes, and have no phases)
TOOLS = {"BestAndLastCheckpoint", "EmbeddingProjector", "FiniteLoss", "GroupMetrics"}
TOOLS |= {"PartialFinetuning", "PredictionWriter", "TokenViews"}
STAGES = sorted(set(callbacks.__all__) - TOOLS)


def test_the_stage_list_is_discovered_not_written_by_hand():
    assert len(STAGES) == 9 and "DeepFeatureReweighting" in STAGES and "GroupDRO" in STAGES


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_builds_on_the_base_and_declares_its_members(name):
    cls = getattr(callbacks, name)
    assert issubclass(cls, Stage), f"{name} is not a Stage"
    stage = cls()
    assert isinstance(cls.stage_label, str) and cls.stage_label
    assert isinstance(stage.uses_annotations, bool) and isinstance(stage.changes_model_at_fit_end, bool)
    assert issubclass(cls.phases, Enum) and stage.phase == next(iter(cls.phases))
    assert cls.report_file is None or cls.report_file.endswith(".json")
    assert stage.before_reports == {}  # nothing ran yet
    state = stage.state_dict()
    assert state["phase"] == stage.phase.value
    again = cls()
    again.load_state_dict(state)
    assert again.phase == stage.phase


@pytest.mark.parametrize(
    "name", [n for n in STAGES if "start_epoch" in getattr(callbacks, n).__init__.__code__.co_varnames]
)
def test_start_epoch_is_validated_by_the_base(name):
    with pytest.raises(Exception, match="start_epoch must be >= 0"):
        getattr(callbacks, name)(start_epoch=-1)


def test_what_uses_annotations_follows_the_arguments():
    assert DeepFeatureReweighting().uses_annotations
    assert not DeepFeatureReweighting(balance="classes").uses_annotations
    assert MaskPruning(groups=[0]).uses_annotations and not MaskPruning().uses_annotations
    assert SpuriousPositiveMining(selection="oracle").uses_annotations
    assert not SpuriousPositiveMining(selection="auto").uses_annotations
    assert SpuriousScore(prune_above=0.5).changes_model_at_fit_end
    assert not SpuriousScore().changes_model_at_fit_end


def test_callbacks_that_are_not_stages_do_not_claim_to_be():
    assert not isinstance(GroupMetrics(), Stage) and not isinstance(EmbeddingProjector(), Stage)


def test_a_subclass_with_a_missing_or_wrong_declaration_is_refused_when_defined():
    with pytest.raises(TypeError, match="stage_label"):
        type("NoLabel", (Stage,), {})
    with pytest.raises(TypeError, match="report_file"):
        type("BadReport", (Stage,), {"stage_label": "x", "report_file": "x.txt"})
    with pytest.raises(TypeError, match="transitions"):
        type(
            "BadTransition",
            (Stage,),
            {"stage_label": "x", "transitions": ((OnceStage.WAITING, "elsewhere"),)},
        )
    with pytest.raises(TypeError, match="start"):
        type("NoStart", (Stage,), {"stage_label": "x", "start_hooks": ("epoch_start",)})
    with pytest.raises(TypeError, match="uses_annotations"):
        type("Fuzzy", (Stage,), {"stage_label": "x", "uses_annotations": "yes"})


def test_a_phase_change_the_stage_did_not_declare_is_refused():
    jtt = JustTrainTwice()
    with pytest.raises(RuntimeError, match="cannot go"):
        jtt.enter(OnceStage.DONE)  # not one of JTT's phases
    jtt.enter(JustTrainTwice.phases.UPWEIGHTING)
    with pytest.raises(RuntimeError, match="cannot go from upweighting to identifying"):
        jtt.enter(JustTrainTwice.phases.IDENTIFYING)


def test_tested_checkpoint_is_the_changing_stage_s_own_else_the_best_else_last(tmp_path: Path):
    for name in ("dfr", "last", "epoch002"):
        (tmp_path / f"{name}.ckpt").write_bytes(b"")
    best = str(tmp_path / "epoch002.ckpt")
    assert stages.tested_checkpoint([DeepFeatureReweighting()], tmp_path, best) == tmp_path / "dfr.ckpt"
    assert stages.tested_checkpoint([JustTrainTwice()], tmp_path, best) == tmp_path / "epoch002.ckpt"
    assert (
        stages.tested_checkpoint([SpuriousScore()], tmp_path, None) == tmp_path / "last.ckpt"
    )  # no pruning: unchanged
    # pruning changes the model: its own checkpoint, else the fit's last state
    assert (
        stages.tested_checkpoint([SpuriousScore(prune_above=0.5)], tmp_path, best) == tmp_path / "last.ckpt"
    )
    assert DeepFeatureReweighting().tested_checkpoint(tmp_path, best) == tmp_path / "dfr.ckpt"
    assert issubclass(DeepFeatureReweighting, ModelStage)


class _OneProcess:
    is_global_zero, world_size = True, 1


def test_decide_on_rank_zero_returns_the_decision_and_raises_its_error():
    assert decide_on_rank_zero(_OneProcess(), lambda: [1, 2]) == [1, 2]

    def refuse():
        raise DataError("group 'x' has 1 sample")

    with pytest.raises(DataError, match="1 sample"):
        decide_on_rank_zero(_OneProcess(), refuse)
