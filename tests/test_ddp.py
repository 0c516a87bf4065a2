"""Callbacks under Lightning DDP (2 CPU processes, gloo, ddp_spawn) give what one process gives."""

from __future__ import annotations

import json

import pytest
import torch

from shortcut_lightning import DeepFeatureReweighting, GroupMetrics, ShortcutClassifier, SyntheticShortcuts

from helpers import make_trainer


def _validate(tmp_path, devices: int) -> dict:
    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet")
    # n_val is odd: ranks get uneven shards, and no sample may be counted twice
    dm = SyntheticShortcuts(n_train=32, n_val=37, n_test=8, image_size=32, batch_size=8)
    trainer = make_trainer(tmp_path, [GroupMetrics(print_table=False)], devices=devices)
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
    trainer = make_trainer(tmp_path, [DeepFeatureReweighting(num_refits=3)], devices=devices)
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


def test_dfr_data_error_on_rank_zero_reaches_every_rank(tmp_path):
    """A refit split DFR refuses (a group of one sample) fails on both ranks, not on rank 0 alone.

    Rank 0 decides; before the shared helper, it raised before the broadcast and left rank 1 waiting.
    """
    from helpers import FailureRecordingDFR

    torch.manual_seed(0)
    dm = SyntheticShortcuts(n_train=32, n_val=5, n_test=8, image_size=32, batch_size=4)
    dfr = FailureRecordingDFR(str(tmp_path), num_refits=2, report_splits=())
    trainer = make_trainer(tmp_path, [dfr], devices=2)
    with pytest.raises(Exception, match="sample in the val split"):
        trainer.validate(ShortcutClassifier("test_resnet"), datamodule=dm)
    recorded = {p.name: p.read_text() for p in tmp_path.glob("rank*.txt")}
    assert recorded == {"rank0.txt": "DataError", "rank1.txt": "DataError"}


def _mine(tmp_path, devices: int) -> dict:
    from shortcut_lightning.callbacks import SpuriousPositiveMining

    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet")
    dm = SyntheticShortcuts(n_train=48, n_val=9, n_test=9, image_size=32, batch_size=8, spurious="patch")
    mining = SpuriousPositiveMining(top_m=6, num_selected=3, n_confusers=3, num_neurons=4, report_splits=())
    trainer = make_trainer(tmp_path, [mining], devices=devices, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    return json.loads((tmp_path / "mining.json").read_text())


def test_mining_ddp_selects_what_one_process_selects(tmp_path):
    single = _mine(tmp_path / "one", devices=1)
    double = _mine(tmp_path / "two", devices=2)
    assert single["neurons"] and double["neurons"] == single["neurons"]
    for name, entry in single["classes"].items():
        for key in ("top_indices", "selected_indices", "neurons"):
            assert double["classes"][name][key] == entry[key]


def test_mining_again_under_ddp_gives_every_rank_the_same_rounds(tmp_path):
    from shortcut_lightning.callbacks import NeuronRegularization, SpuriousPositiveMining

    from helpers import NeuronDump

    torch.manual_seed(0)
    dm = SyntheticShortcuts(n_train=48, n_val=9, n_test=9, image_size=32, batch_size=8, spurious="patch")
    mining = SpuriousPositiveMining(
        top_m=6, num_selected=3, n_confusers=3, num_neurons=4, report_splits=(), every_n_epochs=1
    )
    callbacks = [NeuronDump(str(tmp_path)), mining, NeuronRegularization()]
    trainer = make_trainer(
        tmp_path, callbacks, max_epochs=2, devices=2, limit_train_batches=1, limit_val_batches=0
    )
    trainer.fit(ShortcutClassifier("test_resnet"), datamodule=dm)
    rank_0, rank_1 = (json.loads((tmp_path / f"neurons_rank{r}.json").read_text()) for r in (0, 1))
    assert rank_1 == rank_0
    assert [r["epoch"] for r in rank_0["rounds"]] == [0, 1]
    assert rank_0["penalised"] == sorted({n for r in rank_0["rounds"] for n in r["neurons"]})


def test_regularizing_the_pairs_under_ddp_keeps_every_rank_in_step(tmp_path):
    """The pair forward runs outside DDP's wrapper, so the ranks stay in step only if each penalises the same
    pairs at the same step (the same selection, the same turn): their parameters must end identical."""
    from shortcut_lightning.callbacks import NeuronRegularization

    rank_0 = regularized_ranks_in_step(
        tmp_path, NeuronRegularization(strength=5.0, regularize_on="pairs", pairs_per_step=4)
    )
    assert rank_0["pairs"]


def regularized_ranks_in_step(tmp_path, reg) -> dict:
    """SCORE's mining and ``reg`` for 2 steps on 2 CPU processes; asserts both ranks end with identical
    parameters and the same pairs, and returns rank 0's dump (``WeightDump``)."""
    from shortcut_lightning.callbacks import SpuriousPositiveMining

    from helpers import WeightDump

    torch.manual_seed(0)
    dm = SyntheticShortcuts(n_train=48, n_val=9, n_test=9, image_size=32, batch_size=8, spurious="patch")
    mining = SpuriousPositiveMining(top_m=6, num_selected=3, n_confusers=3, num_neurons=4, report_splits=())
    callbacks = [WeightDump(str(tmp_path)), mining, reg]
    trainer = make_trainer(tmp_path, callbacks, devices=2, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(ShortcutClassifier("test_resnet"), datamodule=dm)
    rank_0, rank_1 = (torch.load(tmp_path / f"weights_rank{r}.pt") for r in (0, 1))
    assert rank_1["pairs"] == rank_0["pairs"]
    for key, value in rank_0["state"].items():
        torch.testing.assert_close(rank_1["state"][key], value, rtol=0, atol=0, msg=key)
    return rank_0


def _prune(tmp_path, devices: int, max_epochs: int = 1, validate: bool = False, **stage) -> list[dict]:
    from shortcut_lightning.callbacks import GroupMetrics, MaskPruning

    from helpers import MaskDump

    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet")
    dm = SyntheticShortcuts(n_train=48, n_val=9, n_test=9, image_size=32, batch_size=8)
    pruning = MaskPruning(
        prune_epochs=1, num_clusters=4, init_logit=0.2, mask_lr=0.5, report_splits=(), export=False, **stage
    )
    callbacks = (
        [GroupMetrics(), pruning, MaskDump(str(tmp_path))] if validate else [MaskDump(str(tmp_path)), pruning]
    )
    trainer = make_trainer(
        tmp_path,
        callbacks,
        max_epochs=max_epochs,
        devices=devices,
        limit_train_batches=3,
        limit_val_batches=2 if validate else 0,
        **({"strategy": "ddp_spawn_find_unused_parameters_true"} if devices > 1 else {}),
    )
    trainer.fit(model, datamodule=dm)
    return [torch.load(tmp_path / f"masks_rank{r}.pt") for r in range(devices)]


@pytest.mark.parametrize("clusters", [{}, {"cluster_within": "class", "cluster_layer": "net.layer2"}])
def test_mask_pruning_ddp_has_one_set_of_clusters_and_masks(tmp_path, clusters):
    (single,) = _prune(tmp_path / "one", devices=1, **clusters)
    first, second = _prune(tmp_path / "two", devices=2, **clusters)
    assert torch.equal(first["clusters"], single["clusters"])  # the gathered embedding, clustered alike
    assert torch.equal(second["clusters"], first["clusters"])
    assert first["masks"].keys() == second["masks"].keys()
    moved = 0
    for name in first["masks"]:
        # the mask gradients are averaged over the ranks, so the logits stay identical on both
        torch.testing.assert_close(second["logits"][name], first["logits"][name], rtol=0, atol=0)
        assert torch.equal(second["masks"][name], first["masks"][name])
        moved += int((first["logits"][name] != 0.2).sum())
    assert moved > 0


def test_mask_pruning_ddp_fine_tunes_on_val_alike_on_every_rank(tmp_path):
    """finetune_split="val": both ranks switch to the validation split for the fine-tuning epoch, shard it
    between them, and end with the same weights."""
    first, second = _prune(tmp_path, devices=2, max_epochs=2, finetune_epochs=1, finetune_split="val")
    assert len(first["drawn"][0]) == len(second["drawn"][0]) == 24  # 3 batches of 8 from train
    val = first["drawn"][1] + second["drawn"][1]  # 9 validation samples, padded to 10 for 2 ranks
    assert len(val) == 10 and set(val) == set(range(9))
    assert first["weights"].keys() == second["weights"].keys()
    for name, weight in first["weights"].items():  # gradients all-reduced on the new split's batches too
        torch.testing.assert_close(second["weights"][name], weight, rtol=0, atol=0)


def test_mask_pruning_ddp_keeps_the_same_best_fine_tuning_state_on_every_rank(tmp_path):
    """finetune_keep="best": the ranks choose by the same all-reduced val/worst_class, so they restore the same
    state and end with the same weights (the dump is taken after the stage's end)."""
    stage = {"finetune_epochs": 2, "monitor": "val/worst_class", "finetune_keep": "best"}
    first, second = _prune(tmp_path, devices=2, max_epochs=3, validate=True, **stage)
    assert first["finetune_best"]["when"] and second["finetune_best"] == first["finetune_best"]
    for name, weight in first["weights"].items():
        torch.testing.assert_close(second["weights"][name], weight, rtol=0, atol=0)


def test_mask_pruning_refuses_plain_ddp(tmp_path):
    import pytest
    from lightning.pytorch.strategies import DDPStrategy

    from shortcut_lightning.errors import ShortcutError
    from shortcut_lightning.methods.prusc.arguments import check_strategy

    with pytest.raises(ShortcutError, match="ddp_find_unused_parameters_true"):
        check_strategy(DDPStrategy(), world_size=2)
    check_strategy(DDPStrategy(find_unused_parameters=True), world_size=2)
