"""PruSC without host syncs in the masked forward and its penalty, and checkpoints that hold no tensor twice."""

from __future__ import annotations

import types

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils._python_dispatch import TorchDispatchMode

from shortcut_lightning import ShortcutClassifier, SyntheticShortcuts
from shortcut_lightning.callbacks import MaskPruning
from shortcut_lightning.methods.prusc.masks import attach_masks, model_masks
from shortcut_lightning.methods.prusc.supcon import cluster_supcon

from conftest import TINY
from helpers import make_trainer

aten = torch.ops.aten
# what makes the host wait for the device: a tensor read as a Python number (``.item()``, ``int()``,
# ``bool()``) and the ops whose output shape depends on the data
WAITS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
}


class _Waits(TorchDispatchMode):
    """Records every op that would make the host wait for the device (CUDA), run here on the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = func is aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        )
        if func in WAITS or boolean_index:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_masked_forward_backward_and_penalty_never_wait_for_the_device():
    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet")
    masks = attach_masks(model)
    for mask in masks.values():
        with torch.no_grad():
            mask.logits.normal_()
    x = torch.randn(8, 3, 32, 32)
    stage = MaskPruning(num_clusters=2)
    stage.phase, stage._masks, stage.clusters = (
        MaskPruning.phases("learning"),
        masks,
        torch.tensor([0, 1] * 4),
    )
    batch = {"index": torch.arange(8), "target": torch.tensor([0, 0, 1, 1] * 2)}
    logged = types.SimpleNamespace(log=lambda *args, **kwargs: None)  # the module's log, which is Lightning's
    for mode in ("off", "learn", "fixed"):
        for mask in masks.values():
            mask.set_mode(mode)
        for training in (True, False):
            model.train(training)
            with _Waits() as waits:
                features = model.features(x)
                loss = model.head(features).logsumexp(1).mean()
                if mode == "learn" and training:  # mask learning: the penalty joins the loss
                    loss = loss + stage.training_penalty(None, logged, batch, {"features": features})
                if training:
                    loss.backward()
            assert waits.seen == [], (mode, training)
    assert all(m.logits.grad is not None and m.logits.grad.abs().sum() > 0 for m in masks.values())
    # no anchor has a positive (one cluster): a zero still attached to the graph, without a wait either
    stage.clusters = torch.zeros(8, dtype=torch.long)
    with _Waits() as waits:
        penalty = stage.training_penalty(None, logged, batch, {"features": model.features(x)})
    assert waits.seen == [] and penalty.requires_grad


def _selected_supcon(features, targets, clusters, temperature):
    """SupCon as it was before: the anchors' rows selected (a shape that depends on the data)."""
    z = torch.nn.functional.normalize(features.float(), dim=1)
    sim = z @ z.T / temperature
    positive = (targets[:, None] == targets[None, :]) & (clusters[:, None] != clusters[None, :])
    negative = (clusters[:, None] == clusters[None, :]) & ~torch.eye(len(z), dtype=torch.bool)
    anchors = positive.any(1)
    if not bool(anchors.any()):
        return sim.sum() * 0.0
    sim, positive, negative = sim[anchors], positive[anchors], negative[anchors]
    denominator = torch.logsumexp(sim.masked_fill(~(positive | negative), float("-inf")), dim=1)
    log_prob = (sim - denominator[:, None]).masked_fill(~positive, 0.0)
    return (-log_prob.sum(1) / positive.sum(1)).mean()


def test_supcon_without_the_selection_has_its_gradients_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        n, dim = int(torch.randint(2, 70, (1,), generator=g)), int(torch.randint(2, 130, (1,), generator=g))
        features = torch.randn(n, dim, generator=g)
        targets = torch.randint(0, 3, (n,), generator=g)
        clusters = torch.randint(0, int(torch.randint(1, 5, (1,), generator=g)), (n,), generator=g)
        grads = []
        for supcon in (_selected_supcon, cluster_supcon):
            x = features.clone().requires_grad_(True)
            value = supcon(x, targets, clusters, 0.07)
            (0.7 * value).backward()
            grads.append(x.grad)
            torch.testing.assert_close(value, _selected_supcon(features, targets, clusters, 0.07))
        assert torch.equal(grads[0], grads[1]) and not grads[1].isnan().any()


def test_a_loaded_state_sets_the_mode_as_the_saved_buffer_says():
    """Checkpoints record the mode in the ``mode_id`` buffer (as they always did): loading one sets the mode."""
    saved = ShortcutClassifier("test_resnet")
    for mask in attach_masks(saved).values():
        mask.set_mode("fixed")
    model = ShortcutClassifier("test_resnet")
    masks = attach_masks(model)
    model.load_state_dict(saved.state_dict())
    assert {m.mode for m in masks.values()} == {"fixed"}
    assert not any(m.logits.requires_grad for m in masks.values())  # loading sets the mode only, as before


class _Scripted(L.Callback):
    """Logs ``val/worst_class`` from a script, one value per epoch, and saves a checkpoint after each validation
    (after the stage's own hooks), with the eval outputs of the masked model on ``x``."""

    def __init__(self, values, root):
        self.values, self.root, self.weights = values, root, {}
        self.x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def on_validation_epoch_end(self, trainer, pl_module):
        pl_module.log("val/worst_class", self.values[trainer.current_epoch])
        self.weights[trainer.current_epoch] = _weights(pl_module)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            trainer.save_checkpoint(self.root / f"epoch{trainer.current_epoch}.ckpt")


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith("weight")}


def _tensors(value, path="", out=None) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of a loaded checkpoint, with where it is, through dicts, lists and tuples."""
    out = [] if out is None else out
    if isinstance(value, torch.Tensor):
        out.append((path, value))
    elif isinstance(value, dict):
        for k, v in value.items():
            _tensors(v, f"{path}/{k}", out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _tensors(v, f"{path}/{i}", out)
    return out


def _twice(path) -> list[tuple[str, str]]:
    """Pairs of tensors of at least 64 elements, not constant, that are equal or share their storage.

    Two entries of one state dict (the model's, a kept copy of it, the optimizer's) are distinct by construction,
    whatever their values: a residual block's two BatchNorm biases get the same gradient and stay equal from
    their zero init."""
    found = [
        (name, t)
        for name, t in _tensors(torch.load(path, map_location="cpu", weights_only=False))
        if t.numel() >= 64 and not bool((t == t.flatten()[0]).all())
    ]
    pairs = []
    for i, (a, ta) in enumerate(found):
        for b, tb in found[i + 1 :]:
            same_dict = a.rsplit("/", 1)[0] == b.rsplit("/", 1)[0]
            if same_dict or a.split("/")[1] == b.split("/")[1] == "optimizer_states":
                continue
            shared = ta.untyped_storage().data_ptr() == tb.untyped_storage().data_ptr()
            if shared or (ta.dtype == tb.dtype and ta.shape == tb.shape and torch.equal(ta, tb)):
                pairs.append((a, b))
    return pairs


# the script of val/worst_class: epoch 1's masks validate best (above the dense model), then fine-tuning epoch 3,
# which stays the best; epoch 0 is ERM (the stage waits)
VALUES = [0.0, 2.0, 0.1, 3.0, 0.2, 0.5]


def _stage_fit(root, max_epochs, ckpt_path=None):
    """ERM epoch 0, mask epochs 1-2, fine-tuning epochs 3-5; a checkpoint after each validation in ``root`` and
    ``last.ckpt`` in ``root / "ck"``."""
    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet")
    stage = MaskPruning(
        start_epoch=1,
        prune_epochs=2,
        finetune_epochs=3,
        num_clusters=4,
        mask_lr=0.5,
        init_logit=0.5,
        monitor="val/worst_class",
        keep_dense=True,
        finetune_keep="best",
        report_splits=("val",),
        export=False,
    )
    script = _Scripted(VALUES, root)
    callbacks = [stage, script, ModelCheckpoint(dirpath=root / "ck", save_last=True)]
    trainer = make_trainer(
        root, callbacks, max_epochs, limit_train_batches=2, limit_val_batches=1, enable_checkpointing=True
    )
    trainer.fit(model, datamodule=SyntheticShortcuts(**TINY), ckpt_path=ckpt_path)
    return model, stage, script


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """A fit stopped after fine-tuning epoch 4 (epoch 3 best), with ``end.ckpt`` saved after it."""
    root = tmp_path_factory.mktemp("staged")
    model, stage, script = _stage_fit(root, max_epochs=5)
    model.trainer.save_checkpoint(
        root / "end.ckpt"
    )  # the masks fixed, the best state restored (not exported)
    return root, stage, script


def test_checkpoints_of_every_phase_hold_no_tensor_twice_and_load_as_the_network_evaluation_sees(staged):
    root, stage, script = staged
    assert stage.report.best["epoch"] == 1
    assert stage.report.finetune_best["when"] == "after fine-tuning epoch 3"
    phases = {}
    for epoch in range(5):
        saved = torch.load(root / f"epoch{epoch}.ckpt", map_location="cpu", weights_only=False)
        phases[epoch] = next(v for k, v in saved["callbacks"].items() if "MaskPruning" in k)["phase"]
        assert _twice(root / f"epoch{epoch}.ckpt") == [], epoch
    # waiting (masks off), learning (the best masks: the dense model, then epoch 1's, current when saved, then a
    # copy), fine-tuning (epoch 3's state, current when saved, then a copy whose masks are the model's)
    assert phases == {0: "waiting", 1: "learning", 2: "learning", 3: "fixed", 4: "fixed"}
    assert _twice(root / "end.ckpt") == []
    # a mid-stage checkpoint through model.weights: the network evaluation sees, the masks multiplied in
    for epoch in (0, 1, 4):
        path = root / f"epoch{epoch}.ckpt"
        masked = ShortcutClassifier("test_resnet")
        attach_masks(masked)
        masked.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])
        plain = ShortcutClassifier("test_resnet", weights=str(path)).eval()
        assert not model_masks(plain)
        with torch.no_grad():
            torch.testing.assert_close(plain(script.x), masked.eval()(script.x), rtol=0, atol=0)


def test_a_run_resumed_where_its_best_is_an_earlier_epoch_ends_on_that_state(staged, tmp_path):
    """Saved after fine-tuning epoch 4 with epoch 3 best: the kept state's mask logits, which the fine-tuning does
    not change, are the model's own in the checkpoint and are read back from the loaded model; the resumed run
    ends on epoch 3's state."""
    root, _, first = staged
    last = root / "ck" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    kept = next(v for k, v in saved["callbacks"].items() if "MaskPruning" in k)["best_weights"]
    assert kept["when"] == "after fine-tuning epoch 3"
    markers = [k for k, v in kept["state"].items() if isinstance(v, str)]
    assert any(k.endswith("logits") for k in markers)  # fixed masks: the fine-tuning does not change them
    model, stage, again = _stage_fit(tmp_path, max_epochs=6, ckpt_path=last)
    assert list(again.weights) == [4, 5]  # epoch 4 validated again after the resume, then epoch 5 trained
    assert stage.report.finetune_best["when"] == "after fine-tuning epoch 3"
    now = _weights(model)
    assert any(not torch.equal(now[k], again.weights[5][k]) for k in now), "epoch 5 trained"
    assert all(torch.equal(now[k], first.weights[3][k]) for k in now)
    logits = {k: v for k, v in model.state_dict().items() if k.endswith("logits")}
    assert logits and all(torch.equal(v, saved["state_dict"][k]) for k, v in logits.items())
