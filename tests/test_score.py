"""SCORE: the mining steps on tensors, the mining and regularization callbacks, DDP and resume."""

from __future__ import annotations

import json
from functools import partial

import lightning as L
import pytest
import torch

from shortcut_lightning import ShortcutClassifier, ShortcutError
from shortcut_lightning.callbacks import NeuronRegularization, SpuriousPositiveMining
from shortcut_lightning.data import SyntheticShortcuts
from shortcut_lightning.methods.score.lrp_analysis import SampleAnalysis
from shortcut_lightning.methods.score.selection_rules import ClassCandidates
from shortcut_lightning.methods.score.spurious_positives import (
    confuser_similarity,
    mask_images,
    mask_overlap,
    neuron_scores,
    relevance_mask,
    select_neurons,
)
from shortcut_lightning.probing.model_parts import freeze_before

from helpers import make_trainer

# -- the steps on tensors ----------------------------------------------------------------------------


def test_relevance_mask_keeps_the_top_share_of_positive_relevance():
    rel = torch.zeros(2, 3, 4, 4)
    rel[0, 0, 0, :2] = torch.tensor([5.0, 4.0])  # the two most relevant pixels of image 0
    rel[0, 1, 3, 3] = -9.0
    rel[1] = -1.0  # image 1: nothing positive
    mask = relevance_mask(rel, top_q=2 / 16)
    assert mask.shape == (2, 1, 4, 4)
    assert mask[0, 0].nonzero().tolist() == [[0, 0], [0, 1]]
    assert not mask[1].any()
    grown = relevance_mask(rel, top_q=2 / 16, dilation=1)
    assert grown[0, 0, :2, :3].all() and grown[0].sum() == 6
    with pytest.raises(ShortcutError, match="top_q"):
        relevance_mask(rel, top_q=0)


def test_masked_image_keeps_the_region_and_fills_the_rest():
    x = torch.arange(8.0).view(1, 2, 2, 2)
    mask = torch.tensor([[[[True, False], [False, True]]]])
    out = mask_images(x, mask, fill=-1.0)
    assert out[0, :, 0, 0].tolist() == [0.0, 4.0]
    assert out[0, :, 0, 1].tolist() == [-1.0, -1.0]


def test_neuron_scores_follow_the_formula_and_selection_rules():
    gen = torch.Generator().manual_seed(0)
    act, rel = torch.rand(5, 12, generator=gen), torch.randn(5, 12, generator=gen)
    expected = torch.stack([sum(act[i, j] * max(rel[i, j], 0) for i in range(5)) / 5 for j in range(12)])
    scores = neuron_scores(act, rel)
    torch.testing.assert_close(scores, expected)
    assert select_neurons(scores, k=3).tolist() == expected.argsort(descending=True)[:3].tolist()
    by_z = select_neurons(scores, k=None, z=1.0)
    assert (scores[by_z] > scores.mean() + scores.std()).all()
    with pytest.raises(ShortcutError, match="only 12 channels"):
        select_neurons(scores, k=13)


def test_overlap_and_confuser_similarity():
    masks = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    masks[:, 0, 0, :2] = True  # two pixels each
    spurious = torch.zeros_like(masks)
    spurious[0, 0, 0, 0] = True  # a one-pixel region, all covered: 1.0
    spurious[1, 0, 0, 1:] = True  # a three-pixel region, one of the mask's two pixels inside: 0.5
    spurious[2, 0, 3, 3] = True  # disjoint: 0.0
    assert mask_overlap(masks, spurious).tolist() == [1.0, 0.5, 0.0]
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sim = confuser_similarity(emb, torch.tensor([[2.0, 0.0], [3.0, 0.0]]))
    assert sim[0] > 0.99 and abs(float(sim[1])) < 1e-6


# -- the callbacks -----------------------------------------------------------------------------------


def test_review_sheet_frames_and_labels_exactly_the_selected_tiles():
    from shortcut_lightning.methods.score.mining_figures import FRAME, review_sheet

    images, masks = torch.zeros(5, 3, 8, 8), torch.ones(5, 1, 8, 8, dtype=torch.bool)
    figure = review_sheet(images, masks, [10, 11, 12, 13, 14], [12], "title", columns=3)
    (ax,) = figure.axes
    mosaic = ax.images[0].get_array()
    red = (abs(mosaic - FRAME) < 1e-6).all(axis=-1)
    cell_h, cell_w = mosaic.shape[0] // 2, mosaic.shape[1] // 3  # 2 rows of 3 cells
    framed = {
        (r, c)
        for r in range(2)
        for c in range(3)
        if red[r * cell_h : (r + 1) * cell_h, c * cell_w : (c + 1) * cell_w].any()
    }
    assert framed == {(0, 2)}  # index 12 is the third tile
    labels = {t.get_text(): tuple(t.get_color()) == tuple(FRAME) for t in ax.texts}
    assert labels == {"10": False, "11": False, "12": True, "13": False, "14": False}


def test_review_sheet_shows_each_sample_whole_beside_its_masked_image():
    from shortcut_lightning.data.transforms import denormalize
    from shortcut_lightning.methods.score.mining_figures import review_sheet

    images = torch.full((1, 3, 8, 8), 1.5)  # normalised: bright
    masks = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    masks[..., :, :4] = True  # relevance on the left half only
    (ax,) = review_sheet(images, masks, [7], [], "title").axes
    mosaic = ax.images[0].get_array()
    bright = denormalize(images)[0, :, 0, 0].numpy()
    grey = denormalize(torch.zeros(1, 3, 1, 1))[0, :, 0, 0].numpy()  # fill 0: the dataset mean
    rows = (abs(mosaic - bright) < 1e-6).all(-1).any(1).nonzero()[0]
    top, left = rows[0], (abs(mosaic[rows[0]] - bright) < 1e-6).all(-1).nonzero()[0][0]
    tile = mosaic[top : top + 8, left : left + 17]  # 8 px original, 1 px line, 8 px masked
    assert (abs(tile[:, :8] - bright) < 1e-6).all()  # the original, undimmed
    assert (abs(tile[:, 9:13] - bright) < 1e-6).all()  # masked image: the relevant half kept
    assert (abs(tile[:, 13:17] - grey) < 1e-6).all()  # and the rest set to the fill


def _data(**kwargs) -> SyntheticShortcuts:
    return SyntheticShortcuts(
        **{
            "n_train": 64,
            "n_val": 21,
            "n_test": 21,
            "image_size": 32,
            "batch_size": 16,
            "spurious": "patch",
            **kwargs,
        }
    )


def _mining(**kwargs) -> SpuriousPositiveMining:
    return SpuriousPositiveMining(
        **{"top_m": 8, "num_selected": 3, "n_confusers": 4, "num_neurons": 4, **kwargs}
    )


def test_mining_writes_its_report_sheets_and_neurons(tmp_path, caplog):
    torch.manual_seed(0)
    mining = _mining(selection="oracle", oracle_min_overlap=0.0, require_masked_prediction=False)
    trainer = make_trainer(tmp_path, [mining, NeuronRegularization(strength=0.5)])
    trainer.fit(ShortcutClassifier("test_resnet"), datamodule=_data())
    result = json.loads((tmp_path / "mining.json").read_text())
    assert result == json.loads(json.dumps(mining.result.to_dict()))
    assert result["uses_annotations"] is True and "[oracle: uses spurious annotations]" in caplog.text
    for name, entry in result["classes"].items():
        assert len(entry["top_indices"]) == 8
        assert 1 <= len(entry["selected_indices"]) <= 3
        assert set(entry["selected_indices"]) <= set(entry["top_indices"])
        assert len(entry["neurons"]) == 4
        assert (tmp_path / f"review_{name}.png").stat().st_size > 0
        assert 0.0 <= entry["lrp_mask_overlap_with_spurious_region"] <= 1.0
    assert result["neurons"] == sorted({n for e in result["classes"].values() for n in e["neurons"]})
    assert result["parameters"]["top_q"] == 0.2 and set(result["before"]) == {"val", "test"}
    assert (tmp_path / "masked_embeddings.png").is_file()
    # the top samples of a class are its own, ranked by the class logit
    targets = trainer.datamodule.dataset("train").targets
    for c, entry in enumerate(result["classes"].values()):
        assert all(int(targets[i]) == c for i in entry["top_indices"])


class _StateRecorder(L.Callback):
    """Keeps a copy of the model's state at each train epoch start (where in the callback list it stands)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})
        assert pl_module.training


def test_mining_in_the_middle_of_fit_leaves_the_model_unchanged(tmp_path):
    """Mining runs in train mode between epochs; none of its passes (the layer probe, ranking, LRP) may
    move a BatchNorm statistic. The layer probe once did, so the "before" report and the fine-tuning
    started from a model other than the trained one."""
    torch.manual_seed(0)
    before, after = _StateRecorder(), _StateRecorder()
    trainer = make_trainer(
        tmp_path, [before, _mining(require_masked_prediction=False), after], limit_train_batches=1
    )
    trainer.fit(ShortcutClassifier("test_resnet"), datamodule=_data())
    (state_before,), (state_after,) = before.states, after.states
    assert any("running_mean" in k for k in state_before)
    for key, value in state_before.items():
        assert torch.equal(value, state_after[key]), key


def test_oracle_selects_the_samples_whose_mask_is_most_on_the_spurious_region(tmp_path):
    torch.manual_seed(0)
    mining = _mining(
        selection="oracle", oracle_min_overlap=0.0, require_masked_prediction=False, num_selected=8
    )
    make_trainer(tmp_path, [mining]).fit(ShortcutClassifier("test_resnet"), datamodule=_data())
    for entry in mining.result.classes.values():
        scores = dict(zip(entry.top_indices, entry.selection_scores, strict=False))
        chosen = [scores[i] for i in entry.selected_indices]
        assert chosen == sorted(chosen, reverse=True) and chosen[0] == max(scores.values())


def test_manual_selection_takes_the_given_indices(tmp_path):
    dm = _data()
    dm.setup("fit")
    targets = dm.dataset("train").targets
    picks = {c: (targets == c).nonzero().flatten()[-2:].tolist() for c in (0, 1)}  # likely outside the top m
    mining = _mining(selection="manual", manual_indices=picks)
    make_trainer(tmp_path, [mining]).fit(ShortcutClassifier("test_resnet"), datamodule=dm)
    for c, entry in enumerate(mining.result.classes.values()):
        assert entry.selected_indices == picks[c] and entry.selection_scores is None


def test_manual_indices_that_do_not_exist_or_belong_elsewhere_are_named(tmp_path):
    dm = _data()
    dm.setup("fit")
    targets = dm.dataset("train").targets
    other = int((targets == 1).nonzero()[0])
    for picks, message in (
        ({0: [999]}, r"sample 999, but the train split has samples 0\.\.63"),
        ({0: [other]}, rf"sample {other}, which belongs to class 1"),
    ):
        with pytest.raises(ShortcutError, match=message):
            make_trainer(tmp_path, [_mining(selection="manual", manual_indices=picks)]).fit(
                ShortcutClassifier("test_resnet"), datamodule=dm
            )


def test_bad_mining_arguments_are_named(tmp_path):
    with pytest.raises(ShortcutError, match="manual_indices"):
        SpuriousPositiveMining(selection="manual")
    with pytest.raises(ShortcutError, match="selection must be one of"):
        SpuriousPositiveMining(selection="magic")
    with pytest.raises(ShortcutError, match="every_n_epochs must be >= 1"):
        SpuriousPositiveMining(every_n_epochs=0)
    with pytest.raises(ShortcutError, match=r"has only .* channels"):
        make_trainer(
            tmp_path,
            [
                _mining(
                    num_neurons=10_000,
                    selection="oracle",
                    oracle_min_overlap=0.0,
                    require_masked_prediction=False,
                )
            ],
        ).fit(ShortcutClassifier("test_resnet"), datamodule=_data())


def test_no_sample_passing_stops_the_stage(tmp_path):
    mining = _mining(selection="oracle", oracle_min_overlap=1.5)  # no mask can lie 150% inside
    with pytest.raises(ShortcutError, match="no sample passed the 'oracle' selection in any class"):
        make_trainer(tmp_path, [mining, NeuronRegularization()]).fit(
            ShortcutClassifier("test_resnet"), datamodule=_data()
        )


def test_oracle_without_masks_is_refused(metadata_folder, tmp_path):
    from shortcut_lightning.data import MetadataDataModule

    dm = MetadataDataModule(root=str(metadata_folder(masks=False)), image_size=32, num_workers=0)
    with pytest.raises(ShortcutError, match=r"needs spurious-region masks.*mask_filename"):
        make_trainer(tmp_path, [_mining(selection="oracle")]).fit(
            ShortcutClassifier("test_resnet"), datamodule=dm
        )


# -- regularization ---------------------------------------------------------------------------------


def test_penalty_is_the_mean_pooled_activation_of_the_selected_neurons():
    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet")
    x = torch.randn(4, 3, 32, 32)
    features = {}
    model.net.layer3.register_forward_hook(lambda m, a, out: features.setdefault("out", out))
    for norm, reduce in (("l1", torch.abs), ("l2", torch.square)):
        reg = NeuronRegularization(strength=2.5, norm=norm, neurons=[1, 3], layer="net.layer3")
        reg._activate(L.Trainer(logger=False), model)
        model(x)
        pooled = features.pop("out").mean((2, 3))[:, [1, 3]]
        with pytest.warns(UserWarning, match="log"):  # no trainer loop: the logged value is dropped
            penalty = reg.training_penalty(None, model, None, {})
        torch.testing.assert_close(penalty, 2.5 * reduce(pooled).mean())
        reg.on_fit_end(None, model)


def test_regularized_fit_logs_and_lowers_the_selected_activation(tmp_path):
    def selected_activation(strength: float) -> float:
        torch.manual_seed(0)
        model = ShortcutClassifier("test_resnet")
        reg = NeuronRegularization(strength=strength, neurons=[0, 2, 5], layer="net.layer3")
        trainer = make_trainer(tmp_path, [reg], max_epochs=2)
        trainer.fit(model, datamodule=_data())
        assert "train/penalty/neuron_regularization_epoch" in trainer.callback_metrics
        return float(trainer.callback_metrics["score/selected_activation_epoch"])

    assert selected_activation(50.0) < 0.5 * selected_activation(0.0)


def test_neurons_from_a_mining_file_and_finetune_from(tmp_path):
    mined = tmp_path / "mining.json"
    mined.write_text(json.dumps({"layer": "net.layer3", "neurons": [4, 7]}))
    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reg = NeuronRegularization(mining_file=str(mined), finetune_from="net.layer3")
    make_trainer(tmp_path, [reg]).fit(model, datamodule=_data())
    assert (reg.layer, reg.neurons) == ("net.layer3", [4, 7])
    after = model.state_dict()
    assert torch.equal(after["net.conv1.0.weight"], before["net.conv1.0.weight"])
    assert torch.equal(after["net.layer2.0.conv1.weight"], before["net.layer2.0.conv1.weight"])
    assert not torch.equal(after["net.layer3.0.conv1.weight"], before["net.layer3.0.conv1.weight"])


class _AdamSteps(L.Callback):
    """The optimizer's step count on the head's weight after the first batch of each epoch."""

    def __init__(self) -> None:
        self.steps: dict[int, int] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            state = trainer.optimizers[0].state[pl_module.net.fc.weight]
            self.steps[trainer.current_epoch] = int(state["step"])


def test_fresh_optimizer_clears_the_state_once_when_the_stage_starts(tmp_path):
    def fit(fresh: bool, max_epochs: int = 2, ckpt=None) -> tuple[L.Trainer, dict[int, int]]:
        torch.manual_seed(0)
        steps = _AdamSteps()
        reg = NeuronRegularization(start_epoch=1, neurons=[0], layer="net.layer3", fresh_optimizer=fresh)
        model = ShortcutClassifier("test_resnet", optimizer=partial(torch.optim.AdamW, lr=1e-3))
        trainer = make_trainer(tmp_path, [reg, steps], max_epochs=max_epochs)
        trainer.fit(model, datamodule=_data(), ckpt_path=ckpt)  # 4 steps an epoch
        return trainer, steps.steps

    assert fit(False)[1] == {0: 1, 1: 5}
    trainer, steps = fit(True)
    assert steps == {0: 1, 1: 1}
    trainer.save_checkpoint(tmp_path / "in_stage.ckpt")
    assert fit(True, max_epochs=3, ckpt=tmp_path / "in_stage.ckpt")[1] == {2: 5}  # not cleared again


def test_regularization_arguments_are_checked(tmp_path):
    with pytest.raises(ShortcutError, match="give layer"):
        NeuronRegularization(neurons=[1])
    with pytest.raises(ShortcutError, match="does not exist"):
        NeuronRegularization(mining_file=str(tmp_path / "nope.json"))
    with pytest.raises(ShortcutError, match="norm must be"):
        NeuronRegularization(norm="l3")
    with pytest.raises(ShortcutError, match="regularize_on must be one of all, pairs, class, got 'batch'"):
        NeuronRegularization(regularize_on="batch")
    with pytest.raises(ShortcutError, match="pairs_per_step must be >= 1"):
        NeuronRegularization(regularize_on="pairs", pairs_per_step=0)
    with pytest.raises(ShortcutError, match=r"neurons=\[...\] and mining_file carry no samples"):
        NeuronRegularization(regularize_on="pairs", neurons=[1], layer="net.layer3")
    with pytest.raises(ShortcutError, match="add SpuriousPositiveMining"):
        make_trainer(tmp_path, [NeuronRegularization()]).fit(
            ShortcutClassifier("test_resnet"), datamodule=_data()
        )
    with pytest.raises(ShortcutError, match="finetune_from"):
        freeze_before(ShortcutClassifier("test_resnet"), "net.layer9")


class _PenalisedIndex(L.Callback):
    """The channel indices NeuronRegularization penalises, after the first step of each epoch."""

    def __init__(self, reg: NeuronRegularization) -> None:
        self.reg = reg
        self.seen: dict[int, list[int]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0 and self.reg._index is not None:
            self.seen[trainer.current_epoch] = self.reg._index.tolist()


def test_mining_again_adds_the_new_rounds_neurons_to_the_penalty(tmp_path, monkeypatch):
    import shortcut_lightning.methods.score.mining_round as module

    picks = iter([[1], [2], [2], [5], [7], [1]])  # per mining round, one pick per class
    monkeypatch.setattr(module, "select_neurons", lambda *a: torch.tensor(next(picks)))
    saved = []
    monkeypatch.setattr(
        SpuriousPositiveMining, "_save_model_before", staticmethod(lambda trainer: saved.append(1))
    )
    torch.manual_seed(0)
    kwargs = {"selection": "oracle", "oracle_min_overlap": 0.0, "require_masked_prediction": False}
    mining = _mining(start_epoch=1, every_n_epochs=1, **kwargs)
    reg = NeuronRegularization(start_epoch=1)
    index = _PenalisedIndex(reg)
    make_trainer(tmp_path, [mining, reg, index], max_epochs=4).fit(
        ShortcutClassifier("test_resnet"), datamodule=_data()
    )
    result = json.loads((tmp_path / "mining.json").read_text())
    assert result["rounds"] == [
        {"epoch": 1, "neurons": [1, 2]},
        {"epoch": 2, "neurons": [2, 5]},
        {"epoch": 3, "neurons": [1, 7]},
    ]
    assert result["neurons"] == [1, 2, 5, 7] and result["epoch"] == 3
    assert index.seen == {1: [1, 2], 2: [1, 2, 5], 3: [1, 2, 5, 7]}
    assert len(saved) == 1  # before_mining.ckpt is the model before the stage, written once
    assert result["parameters"]["every_n_epochs"] == 1


def test_resume_keeps_the_mining_result(tmp_path, monkeypatch):
    torch.manual_seed(0)
    kwargs = {"selection": "oracle", "oracle_min_overlap": 0.0, "require_masked_prediction": False}
    first = _mining(start_epoch=1, **kwargs)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        callbacks=[first, NeuronRegularization(start_epoch=1)],
    )
    trainer.fit(ShortcutClassifier("test_resnet"), datamodule=_data())
    assert (tmp_path / "checkpoints" / "before_mining.ckpt").is_file()
    ckpt = next((tmp_path / "checkpoints").glob("epoch*.ckpt"))
    second = _mining(start_epoch=1, **kwargs)
    monkeypatch.setattr(SpuriousPositiveMining, "mine", lambda *a: pytest.fail("mined again after resume"))
    reg = NeuronRegularization(start_epoch=1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        callbacks=[second, reg],
    )
    trainer.fit(ShortcutClassifier("test_resnet"), datamodule=_data(), ckpt_path=ckpt)
    assert second.result == first.result and reg.neurons == first.result.neurons
    assert second.pairs.indices == first.pairs.indices and torch.equal(second.pairs.masks, first.pairs.masks)


def test_a_checkpoint_of_before_the_stage_base_still_loads():
    """The callbacks' states as saved before the Stage base: the miner's ``{"result", "pairs"}`` (its result from
    before rounds were recorded), the regularization's ``{"optimizer_cleared"}``."""
    from shortcut_lightning.methods.score.mining_result import ClassReport, MiningRound

    entry = {
        "top_indices": [3, 5],
        "selected_indices": [5],
        "masked_prediction_kept": 2,
        "selection_scores": [0.9, 0.8],
        "neurons": [4, 1],
        "neuron_scores": [0.5, 0.25],
    }
    saved = {
        "selection": "auto",
        "uses_annotations": False,
        "layer": "net.layer3",
        "neurons": [1, 4],
        "classes": {"a": entry},
        "before": {},
        "epoch": 2,
        "parameters": {"top_m": 2},
    }
    masks = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    miner = SpuriousPositiveMining()
    miner.load_state_dict({"result": saved, "pairs": {"indices": [5], "masks": masks, "fill": 0.0}})
    assert miner.phase == miner.phases.MINED and not miner.waiting and miner.neurons == [1, 4]
    assert miner.result.classes["a"] == ClassReport(**entry) and miner.result.rounds == [
        MiningRound(2, [1, 4])
    ]
    assert miner.result.classes["a"].to_dict() == entry and list(miner.result.classes["a"].to_dict()) == list(
        entry
    )
    assert miner.pairs.indices == [5] and torch.equal(miner.pairs.masks, masks)
    again = SpuriousPositiveMining()
    again.load_state_dict(miner.state_dict())  # today's layout: phase, report, pairs
    assert again.phase == miner.phase and again.result == miner.result and again.pairs.indices == [5]
    never = SpuriousPositiveMining()
    never.load_state_dict({"result": None, "pairs": None})
    assert never.waiting and never.result is None and never.pairs is None
    reg = NeuronRegularization()
    reg.load_state_dict({"optimizer_cleared": True})  # starts again at start_epoch, without clearing twice
    assert reg.waiting and reg.optimizer_cleared


def _analysis(n: int, **kwargs) -> SampleAnalysis:
    empty = {"images": torch.zeros(n, 3, 2, 2), "masks": torch.ones(n, 1, 2, 2, dtype=torch.bool)}
    empty |= {"activation": torch.zeros(n, 4), "relevance": torch.zeros(n, 4), "embedding": torch.zeros(n, 2)}
    return SampleAnalysis(**{**empty, "kept": torch.ones(n, dtype=torch.bool), **kwargs})


def test_selection_rules_rank_the_eligible_top_samples():
    from shortcut_lightning.methods.score.selection_rules import ManualSelection, OracleSelection

    found = _analysis(
        5, kept=torch.tensor([1, 1, 0, 1, 1]).bool(), overlap=torch.tensor([0.9, 0.2, 1.0, 0.7, 0.95])
    )
    candidates = ClassCandidates(1, [10, 11, 12, 13, 14], found, probe=None, train=None)
    # 2 lost its class when masked, 4 is outside the top 4, 1 overlaps too little: 0 then 3
    picked = OracleSelection(top_m=4, num_selected=3, require_masked_prediction=True, min_overlap=0.5)
    assert picked.select(candidates).chosen == [0, 3]
    relaxed = OracleSelection(top_m=4, num_selected=2, require_masked_prediction=False, min_overlap=0.5)
    assert relaxed.select(candidates).chosen == [2, 0]
    manual = ManualSelection({1: [13, 10], 0: [99]}).select(candidates)
    assert manual.chosen == [3, 0] and manual.scores is None


def test_auto_selection_ranks_by_similarity_to_the_confusers_of_other_classes():
    from types import SimpleNamespace

    from shortcut_lightning.methods.score.selection_rules import AutoSelection

    asked = []

    class Probe:
        def analyse(self, indices, c, desc):
            asked.append((indices, c))
            return _analysis(2, embedding=torch.tensor([[2.0, 0.0], [3.0, 0.1]]))

    train = SimpleNamespace(  # the other classes' samples 21, 22 have the highest class-1 logits
        target=torch.tensor([0, 0, 0, 1]),
        logits=torch.tensor([[0, 0.2], [0, 0.9], [0, 0.5], [0, 3.0]]),
        index=torch.tensor([20, 21, 22, 23]),
    )
    embedding = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [1.0, 0.1]])
    candidates = ClassCandidates(1, [10, 11, 12, 13, 14], _analysis(5, embedding=embedding), Probe(), train)
    picked = AutoSelection(top_m=5, num_selected=3, require_masked_prediction=False, n_confusers=2).select(
        candidates
    )
    assert asked == [([21, 22], 1)] and picked.chosen == [0, 4, 2] and len(picked.confusers) == 2
    assert picked.scores.argsort(descending=True).tolist() == [0, 4, 2, 1, 3]


def test_a_round_s_figures_stay_on_the_rank_that_drew_them():
    import pickle

    from shortcut_lightning.methods.score.mining_result import ClassReport
    from shortcut_lightning.methods.score.mining_round import ClassFindings, RoundFindings

    masks = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    found = {
        "a": ClassFindings(ClassReport([1, 2], [2], 2, None, [5, 0]), masks, sheet=lambda: 0, panel={"x": 1}),
        "b": ClassFindings(ClassReport([3], [3], 1, None, [5, 7]), masks),
    }
    decision = pickle.loads(pickle.dumps(RoundFindings(found, fill=0.0)))  # a lambda would not pickle
    assert decision.sheets == {"a": None, "b": None} and decision.panels == {}
    assert (
        decision.neurons == [0, 5, 7] and decision.pairs.indices == [2, 3] and len(decision.pairs.masks) == 2
    )
    assert decision.reports["a"] == found["a"].report


def test_pairs_are_the_selected_samples_and_their_masked_images():
    from shortcut_lightning.methods.score.mining_result import SpuriousPairs

    dataset = [{"image": torch.full((3, 2, 2), float(i + 1))} for i in range(4)]
    masks = torch.tensor([[[True, False], [False, False]], [[True, True], [False, False]]])[:, None]
    images = SpuriousPairs([3, 1], masks, fill=-1.0).images(dataset)
    assert images.shape == (4, 3, 2, 2)
    assert torch.equal(images[0], dataset[3]["image"]) and torch.equal(images[1], dataset[1]["image"])
    assert images[2, 0].tolist() == [[4.0, -1.0], [-1.0, -1.0]]  # sample 3, its mask kept, the rest filled
    assert images[3, 0].tolist() == [[2.0, 2.0], [-1.0, -1.0]]


def test_regularize_on_pairs_penalises_the_selected_pairs_in_turn(tmp_path):
    """Each step forwards pairs_per_step of the pairs (originals, then masked), in eval mode, and the
    penalty is the selected neurons' mean activation on them, not on the training batch."""
    torch.manual_seed(0)
    kwargs = {"selection": "oracle", "oracle_min_overlap": 0.0, "require_masked_prediction": False}
    mining = _mining(**kwargs)
    reg = NeuronRegularization(strength=1.0, regularize_on="pairs", pairs_per_step=4)
    model = ShortcutClassifier("test_resnet")
    seen: list[tuple[torch.Tensor, bool]] = []
    penalties: list[tuple[int, float, float]] = []
    forward, penalty = model.forward, reg.training_penalty

    def spy_forward(x):
        if len(x) == 4:  # the pair forward (training batches have 16)
            seen.append((x.detach().clone(), model.training))
        return forward(x)

    def spy_penalty(*args):
        value = penalty(*args)
        pooled = reg._capture.value.mean(dim=(2, 3))[:, reg.neurons]
        penalties.append((len(reg._capture.value), float(value), float(pooled.detach().abs().mean())))
        return value

    model.forward, reg.training_penalty = spy_forward, spy_penalty
    trainer = make_trainer(tmp_path, [mining, reg], max_epochs=1)
    trainer.fit(model, datamodule=_data())
    pairs = mining.pair_images(trainer.datamodule)
    n = len(pairs)
    assert n == 2 * len(mining.pairs.indices) and n > 4
    assert len(seen) == 4  # 64 samples, batches of 16: one pair forward per step
    for size, value, expected in penalties:
        assert size == 4 and value == pytest.approx(expected, rel=1e-5)  # on the pairs, not the batch
    for step, (x, training) in enumerate(seen):
        take = torch.arange(step * 4, step * 4 + 4) % n
        torch.testing.assert_close(x, pairs[take])
        assert not training  # eval mode: masked images leave BatchNorm's statistics alone
