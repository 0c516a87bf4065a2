"""PruSC (MaskPruning): the contrastive loss, the masks, the callback's phases, resume and DDP."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from shortcut_lightning import ShortcutClassifier
from shortcut_lightning.callbacks import MaskPruning
from shortcut_lightning.errors import ModelError, ShortcutError
from shortcut_lightning.methods.prusc.conv_reach import reachable_of, reachable_weights
from shortcut_lightning.methods.prusc.kmeans import cosine_kmeans
from shortcut_lightning.methods.prusc.masks import (
    attach_masks,
    bake_masks,
    densities,
    model_masks,
    original_weight,
    set_density,
)
from shortcut_lightning.methods.prusc.supcon import cluster_supcon

from helpers import BatchIndices, MaskDump, make_trainer


def _naive_supcon(z, y, c, t):
    z = torch.nn.functional.normalize(z, dim=1)
    losses = []
    for i in range(len(z)):
        pos = [j for j in range(len(z)) if y[j] == y[i] and c[j] != c[i]]
        neg = [j for j in range(len(z)) if c[j] == c[i] and j != i]
        if not pos:
            continue
        denom = sum(torch.exp(z[i] @ z[a] / t) for a in pos + neg)
        losses.append(-sum(torch.log(torch.exp(z[i] @ z[p] / t) / denom) for p in pos) / len(pos))
    return torch.stack(losses).mean()


def test_supcon_matches_a_per_anchor_loop():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(24, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (24,), generator=g)
    c = torch.randint(0, 4, (24,), generator=g)
    fast = cluster_supcon(z, y, c, temperature=0.5)
    torch.testing.assert_close(fast.double(), _naive_supcon(z, y, c, 0.5), rtol=1e-5, atol=1e-5)
    # no anchor with a positive (one cluster): zero, still part of the graph
    z.requires_grad_(True)
    empty = cluster_supcon(z, y, torch.zeros(24, dtype=torch.long))
    assert float(empty.detach()) == 0.0 and empty.requires_grad


def test_supcon_alone_moves_the_mask_logits():
    """The reference code detached its contrastive loss (``.item()``): here it must reach the masks."""
    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet")
    masks = attach_masks(model)
    for mask in masks.values():
        mask.set_mode("learn")
    model.train()
    x = torch.randn(16, 3, 32, 32)
    loss = cluster_supcon(model.features(x), torch.arange(16) % 2, torch.arange(16) % 4)
    loss.backward()
    grads = [m.logits.grad for name, m in masks.items() if name != "net.fc"]  # the head is after the features
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_masks_are_deterministic_in_evaluation_and_bake_into_a_plain_network():
    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet")
    masks = attach_masks(model, ["net.fc", "net.layer4*"])
    assert set(masks) >= {"net.fc"} and all(n == "net.fc" or n.startswith("net.layer4") for n in masks)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    dense = model(x)
    for mask in masks.values():
        mask.set_mode("learn")
        torch.nn.init.normal_(mask.logits)
    first, second = model(x), model(x)
    torch.testing.assert_close(first, second)  # evaluation thresholds, no noise
    assert not torch.allclose(first, dense)
    model.train()
    fc = masks["net.fc"]
    sampled = [model.net.fc.weight.detach().clone() for _ in range(2)]
    assert not torch.equal(sampled[0], sampled[1])  # training samples the Gumbel-sigmoid
    expected_fc = (original_weight(model.net.fc) * (fc.logits > 0)).detach().clone()
    report = densities(model)
    assert 0 < report["net.fc"] < 1 and report["Prune_h"] == pytest.approx(1 - report["net.fc"])
    model.eval()
    assert bake_masks(model) == len(masks)
    assert not model_masks(model)
    assert all(".parametrizations." not in k for k in model.state_dict())
    torch.testing.assert_close(model.net.fc.weight, expected_fc)
    torch.testing.assert_close(model(x), first)


def test_set_density_keeps_the_asked_share():
    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet")
    masks = attach_masks(model)
    for mask in masks.values():
        torch.nn.init.normal_(mask.logits)
    set_density(masks, 0.3)
    kept = sum(float(m.hard().sum()) for m in masks.values()) / sum(m.logits.numel() for m in masks.values())
    assert kept == pytest.approx(0.3, abs=1e-3)
    for bad in (0.0, 1.0):
        with pytest.raises(ShortcutError, match="between 0 and 1"):
            set_density(masks, bad)


def test_cosine_kmeans_finds_separated_directions_deterministically():
    g = torch.Generator().manual_seed(1)
    centres = torch.eye(4, 8) * 5
    x = torch.cat([centres[k] + 0.3 * torch.randn(30, 8, generator=g) for k in range(4)])
    found = cosine_kmeans(x, 4, seed=3)
    truth = torch.arange(4).repeat_interleave(30)
    for k in range(4):  # each true cluster lands in one found cluster, a different one each
        assert found.labels[truth == k].unique().numel() == 1
    assert found.labels.unique().numel() == 4
    assert torch.equal(cosine_kmeans(x, 4, seed=3).labels, found.labels)
    with pytest.raises(ShortcutError, match="cannot make 200 clusters of 120"):
        cosine_kmeans(x, 200)


def _trainer(tmp_path, callbacks, max_epochs, **kwargs) -> L.Trainer:
    return make_trainer(
        tmp_path, callbacks, max_epochs, **{"enable_checkpointing": True, "limit_val_batches": 0, **kwargs}
    )


def test_mask_learning_keeps_weights_frozen_and_writes_a_plain_pruned_model(tmp_path, tiny_synthetic):
    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet")
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith("weight")}
    pruning = MaskPruning(
        prune_epochs=2,
        num_clusters=4,
        mask_lr=0.5,
        init_logit=0.5,
        lambda_sparse=1e-2,
        report_splits=("val",),
        export=False,
    )
    dump = MaskDump(str(tmp_path))
    trainer = _trainer(tmp_path, [dump, pruning], max_epochs=5, enable_checkpointing=False)
    trainer.fit(model, datamodule=tiny_synthetic())
    # a checkpoint that still carries masks loads as plain weights, the masks multiplied in
    trainer.save_checkpoint(tmp_path / "masked.ckpt")
    plain = ShortcutClassifier("test_resnet", weights=str(tmp_path / "masked.ckpt")).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain(x), model.eval()(x))
    # and a test run with the stage in its callbacks evaluates that checkpoint with its masks
    fresh = ShortcutClassifier("test_resnet")
    tester = _trainer(tmp_path / "test", [MaskPruning(num_clusters=4)], 1, enable_checkpointing=False)
    tester.test(fresh, datamodule=tiny_synthetic(), ckpt_path=tmp_path / "masked.ckpt", verbose=False)
    torch.testing.assert_close(fresh.eval()(x), plain(x))
    saved = torch.load(tmp_path / "masks_rank0.pt")
    # cluster-balanced batches: every cluster carries the same total sampling weight
    weights, clusters = trainer.train_dataloader.sampler.weights, pruning.clusters
    per_cluster = torch.zeros(4, dtype=torch.float64).index_add_(0, clusters, weights)
    torch.testing.assert_close(per_cluster, torch.ones(4, dtype=torch.float64))
    # the stage stops the fit once its epochs are done (2 of max 5), and the weights never moved
    assert pruning.phase == "fixed"
    for name, mask in model_masks(model).items():
        torch.testing.assert_close(original_weight(model.get_submodule(name)), before[f"{name}.weight"])
        assert torch.equal(mask.hard(), saved["masks"][name])
        assert not torch.equal(saved["logits"][name], torch.full_like(saved["logits"][name], 0.5))
    report = json.loads((tmp_path / "prusc.json").read_text())
    assert 0 < report["densities"]["Prune_f"] < 1 and 0 <= report["densities"]["Prune_f_reachable"] <= 1
    assert sum(c["n"] for c in report["clusters"]) == 96
    assert set(report["after"]) == {"val"} and not report["uses_annotations"]


def test_finetune_changes_surviving_weights_and_export_loads_as_weights(tmp_path, tiny_synthetic):
    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet")
    pruning = MaskPruning(
        prune_epochs=1, finetune_epochs=1, num_clusters=4, target_density=0.5, report_splits=()
    )
    trainer = _trainer(tmp_path, [pruning], max_epochs=2)
    trainer.fit(model, datamodule=tiny_synthetic())
    # exported: a plain network; half of the weights that can read a pixel are zero, and all the others
    assert not model_masks(model)
    reach = reachable_weights(model, torch.zeros(1, 3, 32, 32))
    live = zero = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
            w = module.weight
            can_act = reachable_of(reach, name, w)
            live += int(can_act.sum())
            zero += int((w[can_act] == 0).sum())
            assert (w[~can_act] == 0).all(), name
    assert zero / live == pytest.approx(0.5, abs=0.01)
    pruned = tmp_path / "checkpoints" / "pruned.ckpt"
    reloaded = ShortcutClassifier("test_resnet", weights=str(pruned))
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    reloaded.eval()
    torch.testing.assert_close(reloaded(x), model(x))


def test_resume_continues_mask_learning(tmp_path, tiny_synthetic):
    """A run killed in the second mask-learning epoch resumes it: same phase, masks and mask optimizer."""
    import subprocess
    import sys

    here = str(Path(__file__).parent)
    ckpt_dir, last, out = str(tmp_path / "ck"), str(tmp_path / "ck" / "last.ckpt"), str(tmp_path / "out.pt")
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch, lightning as L\n"
        f"sys.path.insert(0, {here!r})\n"
        "from helpers import KillAt\n"
        "from shortcut_lightning import ShortcutClassifier, SyntheticShortcuts\n"
        "from shortcut_lightning.callbacks import BestAndLastCheckpoint, MaskPruning\n"
        "torch.manual_seed(0)\n"
        "kill = sys.argv[1] == 'kill'\n"
        "cbs = [MaskPruning(prune_epochs=3, num_clusters=4, report_splits=(), export=False),\n"
        f"       BestAndLastCheckpoint(dirpath={ckpt_dir!r}, save_last=True)] + ([KillAt(1, 2)] if kill else [])\n"
        "t = L.Trainer(accelerator='cpu', max_epochs=3, logger=False, enable_progress_bar=False,\n"
        f"              limit_val_batches=0, default_root_dir={str(tmp_path)!r}, callbacks=cbs)\n"
        "dm = SyntheticShortcuts(n_train=96, n_val=37, n_test=41, image_size=32, batch_size=16)\n"
        f"t.fit(ShortcutClassifier('test_resnet'), datamodule=dm, ckpt_path=None if kill else {last!r})\n"
        f"torch.save({{'phase': cbs[0].phase.value, 'steps': int(cbs[0]._optimizer.state_dict()['state'][0]['step'])}}, {out!r})\n"
    )
    killed = subprocess.run([sys.executable, str(script), "kill"], capture_output=True, text=True)
    assert killed.returncode != 0
    state = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)
    saved = next(v for k, v in state["callbacks"].items() if "MaskPruning" in k)
    assert saved["phase"] == "learning" and state["epoch"] == 0
    assert any(".parametrizations.weight.0.logits" in k for k in state["state_dict"])
    assert saved["optimizer"]["state"], "the mask optimizer's moments are saved"
    resumed = subprocess.run([sys.executable, str(script), "resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = torch.load(out)
    assert result == {
        "phase": "fixed",
        "steps": 3 * 6,
    }  # Adam went on from the saved step: 3 epochs of 6 batches


def test_cluster_balance_holds_from_the_first_epoch_and_after_resume_with_worker_processes(
    tmp_path, tiny_synthetic
):
    """A loader with workers draws an epoch's order when it starts: before on_train_epoch_start for the
    first epoch of a fit, so the stage must hand its weights to the datamodule before the loader exists."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def stage():
        return MaskPruning(prune_epochs=3, num_clusters=4, report_splits=(), export=False)

    torch.manual_seed(0)
    first, pruning = BatchIndices(), stage()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    trainer = _trainer(tmp_path, [first, pruning, ckpt], max_epochs=1)
    trainer.fit(ShortcutClassifier("test_resnet"), datamodule=tiny_synthetic(num_workers=2))
    sampler = trainer.train_dataloader.sampler
    per_cluster = torch.zeros(4, dtype=torch.float64).index_add_(0, pruning.clusters, sampler.weights)
    torch.testing.assert_close(per_cluster, torch.ones(4, dtype=torch.float64))

    def order(epoch):
        sampler.set_epoch(epoch)
        return list(sampler)

    assert first.drawn[0] == order(0)
    assert len(set(first.drawn[0])) < 96  # drawn with replacement, not one pass over the split
    again = BatchIndices()
    resumed = _trainer(tmp_path, [again, stage()], max_epochs=2)
    resumed.fit(
        ShortcutClassifier("test_resnet"),
        datamodule=tiny_synthetic(num_workers=2),
        ckpt_path=tmp_path / "ck" / "last.ckpt",
    )
    assert list(again.drawn) == [1] and again.drawn[1] == order(1)


def test_finetune_split_val_trains_on_the_validation_split_and_resumes_there(tmp_path, tiny_synthetic):
    """The reference code retrains the pruned network on held-out data: the loader switches split once, with
    worker processes too, and a run killed while fine-tuning resumes on that split."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def stage(report_splits=()):
        return MaskPruning(
            prune_epochs=1,
            finetune_epochs=2,
            finetune_split="val",
            num_clusters=4,
            report_splits=report_splits,
            export=False,
        )

    def fit(callbacks, max_epochs, ckpt_path=None):
        trainer = _trainer(tmp_path, callbacks, max_epochs=max_epochs)
        trainer.fit(
            ShortcutClassifier("test_resnet"), datamodule=tiny_synthetic(num_workers=2), ckpt_path=ckpt_path
        )
        return trainer

    torch.manual_seed(0)
    whole, pruning = BatchIndices(), stage(report_splits=("test",))
    trainer = fit([whole, pruning], max_epochs=5)
    assert sorted(whole.drawn) == [0, 1, 2]  # the stage stops the fit after its last epoch
    assert len(whole.drawn[0]) == 96 and len(set(whole.drawn[0])) < 96  # train, cluster-balanced draws
    for epoch in (1, 2):  # val: 37 samples, each once per epoch (the datamodule's default sampler)
        assert sorted(whole.drawn[epoch]) == list(range(37))
    assert whole.drawn[1] != whole.drawn[2]
    assert trainer.reload_dataloaders_every_n_epochs == 0  # the trainer's setting is given back
    assert trainer.datamodule.train_split == "val" and trainer.datamodule.train_weights is None
    assert pruning.report.parameters["finetune_split"] == "val"
    # the group table of the masks alone, between the ERM model's and the fine-tuned one's
    assert set(pruning.report.to_dict()) >= {"before", "fixed", "after"}
    assert pruning.report.fixed["test"]["split"] == "test" and "wga" in pruning.report.fixed["test"]

    torch.manual_seed(0)
    first = BatchIndices()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    fit([first, stage(), ckpt], max_epochs=2)
    assert first.drawn[0] == whole.drawn[0] and first.drawn[1] == whole.drawn[1]
    again = BatchIndices()
    fit([again, stage()], max_epochs=5, ckpt_path=tmp_path / "ck" / "last.ckpt")
    assert list(again.drawn) == [2] and again.drawn[2] == whole.drawn[2]


class _ScriptedMetric(L.Callback):
    """Logs ``val/scripted`` from a script, one value per epoch, and keeps the mask logits each epoch was validated with."""

    def __init__(self, values, name="val/scripted"):
        self.values, self.name, self.seen, self.state = values, name, {}, None

    def on_validation_epoch_end(self, trainer, pl_module):
        pl_module.log(self.name, self.values[trainer.current_epoch])
        self.seen[trainer.current_epoch] = {
            n: m.logits.detach().clone() for n, m in model_masks(pl_module).items()
        }

    def on_train_epoch_end(self, trainer, pl_module):  # what a checkpoint of the last learning epoch holds
        pruning = next((cb for cb in trainer.callbacks if isinstance(cb, MaskPruning)), None)
        if pruning is not None and pruning.phase == "learning":
            self.state = copy.deepcopy(pruning.state_dict())


def test_monitor_keeps_the_masks_of_the_best_validated_epoch(tmp_path, tiny_synthetic):
    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet")
    script = _ScriptedMetric([0.2, 0.9, 0.5])  # epoch 1 is best; the last epoch's masks differ from it
    pruning = MaskPruning(
        prune_epochs=3,
        num_clusters=4,
        mask_lr=0.5,
        init_logit=0.5,
        monitor="val/scripted",
        report_splits=(),
        export=False,
    )
    trainer = _trainer(tmp_path, [script, pruning], 3, limit_val_batches=1, enable_checkpointing=False)
    trainer.fit(model, datamodule=tiny_synthetic())
    assert pruning.best["epoch"] == 1 and pruning.best["score"] == pytest.approx(0.9)
    assert pruning.report.best == {"monitor": "val/scripted", "epoch": 1, "score": pytest.approx(0.9)}
    for name, mask in model_masks(model).items():
        assert not torch.equal(script.seen[1][name], script.seen[2][name])
        assert torch.equal(mask.logits.detach(), script.seen[1][name])
    # the best epoch is part of the callback's state during mask learning, so a resumed run keeps it
    restored = MaskPruning(monitor="val/scripted")
    restored.load_state_dict(script.state)
    assert restored.best["epoch"] == 1
    assert all(torch.equal(restored.best["logits"][n], script.seen[1][n]) for n in script.seen[1])
    # once restored, the copy of the logits leaves the state (it would weigh down pruned.ckpt)
    assert pruning.state_dict()["best"]["logits"] is None and pruning.best["epoch"] == 1
    # a metric that is never logged is named, with what was
    missing = MaskPruning(prune_epochs=1, num_clusters=4, monitor="val/nope", report_splits=(), export=False)
    with pytest.raises(
        ShortcutError,
        match=r"monitor 'val/nope' was not logged in validation \(logged: val/loss, val/scripted",
    ):
        _trainer(tmp_path, [_ScriptedMetric([0.0]), missing], 1, limit_val_batches=1).fit(
            ShortcutClassifier("test_resnet"), datamodule=tiny_synthetic()
        )


@pytest.mark.parametrize("keep_dense", [True, False])
def test_keep_dense_keeps_the_unpruned_model_when_no_mask_epoch_validates_better(
    tmp_path, tiny_synthetic, keep_dense
):
    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet")
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith("weight")}
    script = _ScriptedMetric([-1.0, -0.5], name="val/worst_class")  # below any accuracy of the dense model
    pruning = MaskPruning(
        prune_epochs=2,
        num_clusters=4,
        mask_lr=0.5,
        init_logit=0.5,
        monitor="val/worst_class",
        keep_dense=keep_dense,
        report_splits=("val",),
    )
    _trainer(tmp_path, [script, pruning], 2, limit_val_batches=1, enable_checkpointing=False).fit(
        model, datamodule=tiny_synthetic()
    )
    if not keep_dense:  # the mask epochs alone compete: the better of the two is kept, pruned
        assert pruning.report.best["epoch"] == 1 and pruning.report.densities["Prune_f"] > 0
        return
    dense = pruning.report.before["val"]["worst_class"]
    assert pruning.report.best == {"monitor": "val/worst_class", "epoch": None, "score": pytest.approx(dense)}
    assert pruning.report.densities["Prune_f"] == 0.0
    exported = model.state_dict()
    assert all(torch.equal(exported[k], w) for k, w in weights.items()), "the exported model is the dense one"
    assert pruning.report.after["val"]["worst_class"] == pytest.approx(dense)


def test_keep_dense_with_a_monitor_the_reports_lack_warns(tmp_path, tiny_synthetic):
    pruning = MaskPruning(
        prune_epochs=1, num_clusters=4, monitor="val/scripted", report_splits=("val",), export=False
    )
    with pytest.warns(UserWarning, match="keep_dense: val/scripted is not a summary of the before report"):
        _trainer(tmp_path, [_ScriptedMetric([0.5]), pruning], 1, limit_val_batches=1).fit(
            ShortcutClassifier("test_resnet"), datamodule=tiny_synthetic()
        )
    assert pruning.report.best["epoch"] == 0


def test_monitor_with_batch_statistics_restores_the_best_epochs_batchnorm(tmp_path, tiny_synthetic):
    """batchnorm='batch' moves the running statistics while the masks learn: the best epoch's masks come back
    with the statistics they were validated with (without them, the photo benchmark's worst group fell to 0.23)."""
    stats = {}

    class Statistics(L.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            stats[trainer.current_epoch] = {
                k: v.clone() for k, v in pl_module.state_dict().items() if k.endswith("running_mean")
            }

    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet")
    pruning = MaskPruning(
        prune_epochs=3,
        num_clusters=4,
        mask_lr=0.5,
        init_logit=0.5,
        monitor="val/scripted",
        report_splits=(),
        export=False,
        batchnorm="batch",
    )
    callbacks = [_ScriptedMetric([0.2, 0.9, 0.5]), Statistics(), pruning]
    _trainer(tmp_path, callbacks, 3, limit_val_batches=1, enable_checkpointing=False).fit(
        model, datamodule=tiny_synthetic()
    )
    assert pruning.best["epoch"] == 1
    now = {k: v for k, v in model.state_dict().items() if k.endswith("running_mean")}
    assert not all(torch.equal(stats[1][k], stats[2][k]) for k in now)  # they did move after epoch 1
    assert all(torch.equal(now[k], stats[1][k]) for k in now)


def test_bad_input(tmp_path, tiny_synthetic):
    for kwargs, match in (
        ({"target_density": 0.0}, "between 0 and 1"),
        ({"target_density": 1.0}, "between 0 and 1"),
        ({"num_clusters": 1}, "num_clusters must be >= 2"),
        ({"split": "test"}, "split must be 'train' or 'val'"),
        (
            {"finetune_split": "test", "finetune_epochs": 1},
            "finetune_split must be 'train' or 'val', got 'test'",
        ),
        ({"finetune_split": "val"}, "finetune_split 'val' needs finetune_epochs >= 1"),
        ({"mode": "best"}, "mode must be 'max' or 'min'"),
        ({"batchnorm": "train"}, "batchnorm must be one of 'held', 'batch', got 'train'"),
        ({"sparsity": "l1"}, "sparsity must be one of 'probability', 'logit', got 'l1'"),
    ):
        with pytest.raises(ShortcutError, match=match):
            MaskPruning(**kwargs)
    with pytest.raises(ShortcutError, match="num_clusters=500 is more than the 96 samples"):
        _trainer(tmp_path, [MaskPruning(num_clusters=500)], 1).fit(
            ShortcutClassifier("test_resnet"), datamodule=tiny_synthetic()
        )
    with pytest.raises(ModelError, match=r"matches no conv or linear layer; they are: net\.conv1"):
        _trainer(tmp_path, [MaskPruning(modules=["net.layer9*"])], 1).fit(
            ShortcutClassifier("test_resnet"), datamodule=tiny_synthetic()
        )
    with pytest.raises(ShortcutError, match=r"groups \[7\] do not exist"):
        _trainer(tmp_path, [MaskPruning(groups=[7])], 1).fit(
            ShortcutClassifier("test_resnet"), datamodule=tiny_synthetic()
        )


def test_groups_train_on_those_groups_only_and_say_so(tmp_path, tiny_synthetic):
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch["group"])

    pruning = MaskPruning(prune_epochs=1, num_clusters=2, groups=[0, 3], report_splits=())
    trainer = _trainer(tmp_path, [Spy(), pruning], 1, enable_checkpointing=False)
    trainer.fit(ShortcutClassifier("test_resnet"), datamodule=tiny_synthetic())
    groups = torch.cat(seen)
    assert set(groups.tolist()) <= {0, 3} and len(groups) > 0
    sampler = trainer.train_dataloader.sampler  # weights follow the subset's positions
    assert len(sampler.weights) == len(sampler.positions) and bool((sampler.weights > 0).all())
    assert json.loads((tmp_path / "prusc.json").read_text())["uses_annotations"] is True


def test_batchnorm_is_held_during_mask_learning_and_recalibrated_after(tmp_path, tiny_synthetic):
    """Noisy masks must not leak into the running statistics; the pruned model gets its own."""

    def stats(model):
        return {
            k: v.clone() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))
        }

    # (recalibrate_bn, batchnorm): held stays put unless recalibrated; batch statistics move them while learning
    for recalibrate, batchnorm, moved in (
        (False, "held", False),
        (True, "held", True),
        (False, "batch", True),
    ):
        torch.manual_seed(0)
        model = ShortcutClassifier("test_resnet")
        before = stats(model)
        pruning = MaskPruning(
            prune_epochs=1,
            num_clusters=4,
            report_splits=(),
            export=False,
            recalibrate_bn=recalibrate,
            batchnorm=batchnorm,
        )
        _trainer(tmp_path / f"{recalibrate}{batchnorm}", [pruning], 1, enable_checkpointing=False).fit(
            model, datamodule=tiny_synthetic()
        )
        after = stats(model)
        same = all(torch.equal(before[k], after[k]) for k in before)
        assert same is not moved, (recalibrate, batchnorm)


def test_sparsity_term_is_the_sum_of_keep_probabilities_or_of_logits():
    from shortcut_lightning.methods.prusc.masks import sparsity_term

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 2))
    masks = attach_masks(model)
    for m in masks.values():
        m.logits.data.normal_()
    logits = torch.cat([m.logits.flatten() for m in masks.values()])
    torch.testing.assert_close(sparsity_term(masks, "probability"), torch.sigmoid(logits).sum())
    torch.testing.assert_close(sparsity_term(masks, "logit"), logits.sum())


def test_fused_gumbel_sigmoid_equals_its_autograd_composition():
    from shortcut_lightning.methods.prusc.masks import GumbelSigmoidMask, logistic_noise

    mask = GumbelSigmoidMask(torch.Size([6, 5]), temperature=0.7)
    mask.set_mode("learn")
    torch.nn.init.normal_(mask.logits)
    weight = torch.randn(6, 5, requires_grad=True)
    upstream = torch.randn(6, 5)
    torch.manual_seed(3)
    fused = mask(weight)
    (fused * upstream).sum().backward()
    got = (fused.detach(), weight.grad.clone(), mask.logits.grad.clone())
    weight.grad, mask.logits.grad = None, None
    torch.manual_seed(3)  # the same noise, composed from autograd ops
    soft = torch.sigmoid((mask.logits + logistic_noise(mask.logits)) / 0.7)
    composed = weight * ((soft > 0.5).float() - soft.detach() + soft)
    (composed * upstream).sum().backward()
    for a, b in zip(got, (composed.detach(), weight.grad, mask.logits.grad), strict=True):
        torch.testing.assert_close(a, b)


def test_logistic_noise_is_logistic_in_every_draw_position():
    """Four 16-bit draws come from each random 64-bit integer: each position must be unbiased."""
    from shortcut_lightning.methods.prusc.masks import logistic_noise

    torch.manual_seed(0)
    noise = logistic_noise(torch.empty(400_000, 4))  # column j: the j-th 16 bits of each integer
    torch.testing.assert_close(noise.mean(0), torch.zeros(4), atol=0.02, rtol=0)
    torch.testing.assert_close(noise.var(0), torch.full((4,), torch.pi**2 / 3), atol=0.05, rtol=0)
    for logit in (-3.0, 0.0, 2.0):  # a mask sample keeps a weight with probability sigmoid(logit)
        kept = (noise + logit > 0).double().mean(0)
        torch.testing.assert_close(
            kept,
            torch.full((4,), torch.sigmoid(torch.tensor(logit)).item(), dtype=torch.float64),
            atol=0.004,
            rtol=0,
        )
    assert logistic_noise(torch.empty(3, 5, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_learned_mask_keeps_the_weight_dtype():
    from shortcut_lightning.methods.prusc.masks import GumbelSigmoidMask

    mask = GumbelSigmoidMask(torch.Size([4, 3]))  # float32 logits, as attach_masks creates them
    mask.set_mode("learn")
    weight = torch.randn(4, 3, dtype=torch.bfloat16)
    assert mask(weight).dtype == torch.bfloat16  # a bf16-true model's conv must get bf16 weights back


def _masked_classifier() -> ShortcutClassifier:
    """A classifier with masks on every layer, about half of each pruned, in the fixed (evaluation) mode."""
    from shortcut_lightning.methods.prusc.masks import attach_masks

    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet")
    for mask in attach_masks(model).values():
        with torch.no_grad():
            mask.logits.normal_()
        mask.set_mode("fixed")
    return model.eval()


def test_plain_state_dict_is_the_baked_network_and_leaves_the_model_masked():
    from shortcut_lightning.methods.prusc.masks import bake_masks, model_masks, plain_state_dict

    model = _masked_classifier()
    plain = plain_state_dict(model)
    baked = copy.deepcopy(model)
    bake_masks(baked)
    assert plain.keys() == baked.state_dict().keys()
    for key, value in baked.state_dict().items():
        assert torch.equal(plain[key], value), key
    assert model_masks(model) and not model_masks(baked)


def test_a_masked_checkpoint_loads_as_a_plain_network_through_model_weights(tmp_path):
    """``model.weights=<mid-stage PruSC ckpt>``: the builder reads the exported plain weights, knowing no masks."""
    from shortcut_lightning.backbones import PLAIN_WEIGHTS, create_backbone
    from shortcut_lightning.methods.prusc.masks import plain_state_dict

    model = _masked_classifier()
    path = tmp_path / "masked.ckpt"
    torch.save({"state_dict": model.state_dict(), PLAIN_WEIGHTS: plain_state_dict(model)}, path)
    net = create_backbone("test_resnet", num_classes=2, weights=str(path)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x))
    torch.save({"state_dict": model.state_dict()}, path)  # an older checkpoint: masked weights only
    with pytest.raises(ModelError, match=r"pruned\.ckpt"):
        create_backbone("test_resnet", num_classes=2, weights=str(path))
