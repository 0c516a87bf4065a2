"""The Stage contract: every method's callback declares what the CLI asks of it."""

from __future__ import annotations

import pytest

from shortcut_lightning.callbacks import (
    DeepFeatureReweighting,
    EmbeddingProjector,
    GroupMetrics,
    MaskPruning,
    NeuronRegularization,
    SpuriousPositiveMining,
    SpuriousScore,
)
from shortcut_lightning.errors import DataError
from shortcut_lightning.stages import Stage, decide_on_rank_zero

STAGES = {
    "DFR": DeepFeatureReweighting(),
    "PruSC": MaskPruning(),
    "SCORE": SpuriousPositiveMining(),
    "SCORE fine-tuning": NeuronRegularization(),
    "s-score": SpuriousScore(),
}


@pytest.mark.parametrize("label", STAGES)
def test_every_method_callback_is_a_stage(label):
    stage = STAGES[label]
    assert isinstance(stage, Stage)
    assert stage.stage_label == label
    assert isinstance(stage.uses_annotations, bool) and isinstance(stage.changes_model_at_fit_end, bool)
    assert stage.before_reports == {}  # nothing ran yet


def test_what_uses_annotations_follows_the_arguments():
    assert (
        DeepFeatureReweighting().uses_annotations
        and not DeepFeatureReweighting(balance="classes").uses_annotations
    )
    assert MaskPruning(groups=[0]).uses_annotations and not MaskPruning().uses_annotations
    assert SpuriousPositiveMining(selection="oracle").uses_annotations
    assert not SpuriousPositiveMining(selection="auto").uses_annotations
    assert (
        SpuriousScore(prune_above=0.5).changes_model_at_fit_end
        and not SpuriousScore().changes_model_at_fit_end
    )


def test_callbacks_that_are_not_stages_do_not_claim_to_be():
    assert not isinstance(GroupMetrics(), Stage) and not isinstance(EmbeddingProjector(), Stage)


class _OneProcess:
    is_global_zero, world_size = True, 1


def test_decide_on_rank_zero_returns_the_decision_and_raises_its_error():
    assert decide_on_rank_zero(_OneProcess(), lambda: [1, 2]) == [1, 2]

    def refuse():
        raise DataError("group 'x' has 1 sample")

    with pytest.raises(DataError, match="1 sample"):
        decide_on_rank_zero(_OneProcess(), refuse)
