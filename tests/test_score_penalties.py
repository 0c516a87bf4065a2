"""SCORE's penalty variants (issue 43): contribution, masked logit, where they apply, the random-neuron control,
and neuron selection by a share of the layer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from shortcut_lightning import ShortcutClassifier, ShortcutError
from shortcut_lightning.callbacks import NeuronRegularization, SpuriousPositiveMining
from shortcut_lightning.data import SyntheticShortcuts
from shortcut_lightning.methods.score.penalty_terms import (
    activation_term,
    channel_contributions,
    contribution_term,
    masked_logit_term,
    random_neurons,
)
from shortcut_lightning.methods.score.spurious_positives import select_neurons

from helpers import make_trainer


def _data(**kwargs) -> SyntheticShortcuts:
    settings = {
        "n_train": 64,
        "n_val": 21,
        "n_test": 21,
        "image_size": 32,
        "batch_size": 16,
        "spurious": "patch",
    }
    return SyntheticShortcuts(**{**settings, **kwargs})


def _mining(**kwargs) -> SpuriousPositiveMining:
    settings = {"top_m": 8, "num_selected": 3, "n_confusers": 4, "num_neurons": 4, "report_splits": ()}
    return SpuriousPositiveMining(**{**settings, **kwargs})


ORACLE = {"selection": "oracle", "oracle_min_overlap": 0.0, "require_masked_prediction": False}


def _layer4_and_logits(model: ShortcutClassifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    captured = {}
    handle = model.net.layer4.register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
    logits = model(x)
    handle.remove()
    return captured["out"], logits


def test_a_contribution_is_the_channel_s_term_of_the_logit_for_a_linear_head():
    """Above layer4 sit the mean pool and the linear head: activation x gradient of logit c, summed over the map,
    is exactly w_cj times the pooled channel j; their sum over channels is the logit less the bias."""
    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet").eval()
    activation, logits = _layer4_and_logits(model, torch.randn(4, 3, 32, 32))
    for c in (0, 1):
        contributions = channel_contributions(activation, logits, c)
        expected = model.net.fc.weight[c] * activation.mean((2, 3))
        torch.testing.assert_close(contributions, expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(
            contributions.sum(1), logits[:, c] - model.net.fc.bias[c], rtol=1e-4, atol=1e-5
        )


def test_each_term_follows_its_formula_and_where_it_applies():
    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet").eval()
    activation, logits = _layer4_and_logits(model, torch.randn(6, 3, 32, 32))
    target = torch.tensor([0, 1, 0, 1, 1, 0])
    pooled = activation.mean((2, 3))
    live = pooled.mean(0).argsort(descending=True)[:3]  # channels the random model does not leave at 0
    neurons = {0: live[:2], 1: live[2:]}
    # activation, on the rows of each neuron's class: class 0's neurons on rows 0, 2, 5, class 1's on 1, 3, 4
    by_class = torch.cat(
        [pooled[target == 0][:, live[:2]].flatten(), pooled[target == 1][:, live[2:]].flatten()]
    )
    torch.testing.assert_close(activation_term(activation, neurons, target, "l1"), by_class.abs().mean())
    everywhere = torch.cat([pooled[:, live[:2]].flatten(), pooled[:, live[2:]].flatten()])
    torch.testing.assert_close(activation_term(activation, neurons, None, "l2"), everywhere.pow(2).mean())
    # contribution: per row, the class's neurons' summed share of that class's logit
    w = model.net.fc.weight
    share = {c: (w[c, idx] * pooled[:, idx]).sum(1) for c, idx in neurons.items()}
    rows = torch.cat([share[0][target == 0], share[1][target == 1]])
    value = contribution_term(activation, logits, neurons, target, "l1")
    torch.testing.assert_close(value, rows.abs().mean(), rtol=1e-4, atol=1e-6)
    assert (
        contribution_term(activation, logits, {0: neurons[0]}, torch.ones(6, dtype=torch.long), "l1") is None
    )
    value.backward()  # differentiable: the penalty trains the weights below and at the head
    assert model.net.fc.weight.grad.abs().sum() > 0 and model.net.conv1[0].weight.grad.abs().sum() > 0
    # masked logit: 0 for a uniform prediction; with two classes and margin m, m / 2 - log 2 + log(1 + e^-m)
    assert masked_logit_term(torch.zeros(3, 2)).item() == pytest.approx(0.0, abs=1e-7)
    assert masked_logit_term(torch.tensor([[60.0, 0.0]])).item() == pytest.approx(30 - math.log(2), rel=1e-5)
    assert masked_logit_term(torch.tensor([[0.0, 2.0]])).item() == pytest.approx(
        1 - math.log(2) + math.log1p(math.exp(-2))
    )


def test_the_random_control_draws_the_same_count_outside_the_mined_channels():
    mined = {0: [1, 5, 7], 1: [2]}
    drawn = random_neurons(mined, 16, seed=3)
    assert {c: len(v) for c, v in drawn.items()} == {0: 3, 1: 1}
    assert not {n for v in drawn.values() for n in v} & {1, 2, 5, 7}
    assert random_neurons(mined, 16, seed=3) == drawn and random_neurons(mined, 16, seed=4) != drawn
    with pytest.raises(ValueError, match="3 random neurons asked, 1 channels left"):
        random_neurons({0: [0, 1, 2]}, 4, seed=0)


def test_a_share_of_the_layer_selects_the_best_ceil_share_times_c():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.0, 0.2, 0.4, 0.6, 0.7])
    assert select_neurons(scores, share=0.25).tolist() == [1, 4, 9]  # ceil(2.5) = 3
    assert select_neurons(scores, share=0.01).tolist() == [1]


def test_bad_variant_arguments_are_named(tmp_path):
    with pytest.raises(ShortcutError, match="penalty must be one of activation, contribution, masked_logit"):
        NeuronRegularization(penalty="gradient")
    with pytest.raises(ShortcutError, match="set regularize_on='pairs'"):
        NeuronRegularization(penalty="masked_logit")
    with pytest.raises(ShortcutError, match="neuron_share must be in"):
        _mining(neuron_share=1.5)
    with pytest.raises(ShortcutError, match="z_score or neuron_share, not both"):
        _mining(neuron_share=0.1, z_score=1.0)
    reg = NeuronRegularization(neurons=[1], layer="net.layer3", regularize_on="class")
    trainer = make_trainer(tmp_path, [reg], max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    with pytest.raises(
        ShortcutError, match="regularize_on='class' needs the class each neuron was mined for"
    ):
        trainer.fit(ShortcutClassifier("test_resnet"), datamodule=_data())


def _contribution_after(tmp_path, strength: float, **reg_args) -> tuple[float, NeuronRegularization]:
    """The summed contribution of the penalised class-0 neurons to logit 0 on the training images, after a
    fit of mining then 3 regularized epochs."""
    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet")
    mining = _mining(**ORACLE)
    reg = NeuronRegularization(strength=strength, **reg_args)
    dm = _data()
    make_trainer(tmp_path / str(strength), [mining, reg], max_epochs=3, limit_val_batches=0).fit(
        model, datamodule=dm
    )
    images = torch.stack([dm.dataset("train")[i]["image"] for i in range(32)])
    activation, logits = _layer4_and_logits(model.eval(), images)
    index = torch.tensor(reg.class_neurons[0])
    return float(channel_contributions(activation, logits, 0)[:, index].sum(1).abs().mean()), reg


def test_the_contribution_penalty_drives_the_neurons_share_of_the_logit_down(tmp_path):
    free, _ = _contribution_after(tmp_path, 0.0, penalty="contribution")
    penalised, reg = _contribution_after(tmp_path, 500.0, penalty="contribution", regularize_on="class")
    assert reg.class_neurons and reg.penalty == "contribution"
    assert penalised < 0.5 * free


def test_the_control_penalises_random_neurons_and_masked_logit_only_the_masked_images(tmp_path):
    _, control = _contribution_after(tmp_path, 1.0, random_neurons=True, seed=1)
    mined = {n for chosen in control._mined.values() for n in chosen}
    assert control.neurons and not set(control.neurons) & mined
    assert {c: len(v) for c, v in control.class_neurons.items()} == {
        c: len(v) for c, v in control._mined.items()
    }
    # masked_logit: each step forwards pairs_per_step masked images (never an original)
    torch.manual_seed(0)
    mining = _mining(**ORACLE)
    reg = NeuronRegularization(strength=1.0, penalty="masked_logit", regularize_on="pairs", pairs_per_step=2)
    model = ShortcutClassifier("test_resnet")
    seen, forward = [], model.forward

    def spy(x):
        if len(x) == 2 and torch.is_grad_enabled():  # the pair forward (the mining probes without gradients)
            seen.append(x.detach().clone())
        return forward(x)

    model.forward = spy
    trainer = make_trainer(tmp_path / "masked", [mining, reg], max_epochs=1, limit_val_batches=0)
    trainer.fit(model, datamodule=_data())
    pairs = mining.pair_images(trainer.datamodule)
    masked = pairs[len(pairs) // 2 :]
    assert len(seen) == 4
    for step, x in enumerate(seen):
        torch.testing.assert_close(x, masked[torch.arange(2 * step, 2 * step + 2) % len(masked)])
    assert torch.isfinite(trainer.callback_metrics["train/penalty/neuron_regularization_epoch"])


def test_neurons_by_class_from_the_miner_and_a_mining_file(tmp_path):
    torch.manual_seed(0)
    mining = _mining(**ORACLE)
    reg = NeuronRegularization(strength=0.0, penalty="contribution", regularize_on="class")
    make_trainer(tmp_path, [mining, reg], max_epochs=1, limit_val_batches=0).fit(
        ShortcutClassifier("test_resnet"), datamodule=_data()
    )
    mined = json.loads((tmp_path / "mining.json").read_text())
    names = list(mined["classes"])
    assert reg.class_neurons == {names.index(n): sorted(e["neurons"]) for n, e in mined["classes"].items()}
    again = NeuronRegularization(mining_file=str(tmp_path / "mining.json"), regularize_on="class")
    trainer = make_trainer(
        tmp_path / "again", [again], max_epochs=1, limit_train_batches=1, limit_val_batches=0
    )
    trainer.fit(ShortcutClassifier("test_resnet"), datamodule=_data())
    assert again.class_neurons == reg.class_neurons


def test_the_contribution_penalty_under_ddp_keeps_every_rank_in_step(tmp_path):
    """The penalty's second backward stays inside the one loss DDP all-reduces: both ranks end identical."""
    from test_ddp import regularized_ranks_in_step

    reg = NeuronRegularization(strength=5.0, penalty="contribution", regularize_on="class")
    assert regularized_ranks_in_step(tmp_path, reg)["state"]


def test_the_contribution_penalty_under_bf16_mixed(tmp_path):
    torch.manual_seed(0)
    reg = NeuronRegularization(strength=1.0, penalty="contribution", neurons=[0, 3], layer="net.layer4")
    trainer = make_trainer(tmp_path, [reg], max_epochs=1, limit_val_batches=0, precision="bf16-mixed")
    trainer.fit(ShortcutClassifier("test_resnet"), datamodule=_data())
    value = trainer.callback_metrics["train/penalty/neuron_regularization_epoch"]
    assert torch.isfinite(value) and value > 0
