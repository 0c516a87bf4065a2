"""PruSC's clusters: within each class, on an intermediate layer's pooled output, and their bad input."""

from __future__ import annotations

import json

import pytest
import torch

from shortcut_lightning import ShortcutClassifier
from shortcut_lightning.callbacks import MaskPruning
from shortcut_lightning.errors import ModelError, ShortcutError
from shortcut_lightning.methods.prusc.clusters import cluster_balance_weights, cluster_by_index
from shortcut_lightning.methods.prusc.kmeans import cosine_kmeans
from shortcut_lightning.probing.embedding_pass import Embeddings, collect_embeddings
from shortcut_lightning.probing.model_parts import find_head

from helpers import MaskDump, make_trainer


def _embeddings(features: torch.Tensor, target: torch.Tensor) -> Embeddings:
    n = len(target)
    minus = torch.full((n,), -1)
    return Embeddings(features, torch.zeros(n, 2), target, minus, minus, torch.arange(n))


def test_clusters_within_class_are_each_class_own_kmeans():
    g = torch.Generator().manual_seed(0)
    directions = torch.eye(3, 6) * 5  # both classes spread over the same three directions
    x = torch.cat([directions[k] + 0.3 * torch.randn(20, 6, generator=g) for k in range(3)] * 2)
    target = torch.arange(2).repeat_interleave(60)
    clusters, found = cluster_by_index(_embeddings(x, target), 3, seed=1, within="class")
    assert clusters.unique().tolist() == list(range(6))
    for c in range(2):  # class c holds clusters 3c..3c+2, which are exactly its own k-means
        member = target == c
        assert set(clusters[member].tolist()) == {3 * c, 3 * c + 1, 3 * c + 2}
        torch.testing.assert_close(clusters[member] - 3 * c, cosine_kmeans(x[member], 3, seed=1).labels)
    # one k-means over the split puts both classes into each direction's cluster
    mixed, _ = cluster_by_index(_embeddings(x, target), 3, seed=1)
    assert all(target[mixed == k].unique().numel() == 2 for k in range(3))
    assert found.centroids.shape == (6, 6)
    # the balance weights give every one of the 6 clusters the same total weight
    per_cluster = torch.zeros(6, dtype=torch.float64).index_add_(
        0, clusters, cluster_balance_weights(clusters, None)
    )
    torch.testing.assert_close(per_cluster, torch.ones(6, dtype=torch.float64))


def test_a_class_smaller_than_num_clusters_is_named():
    x, target = torch.randn(12, 4), torch.tensor([0] * 10 + [1] * 2)
    with pytest.raises(ShortcutError, match="class 1 has 2 samples, fewer than num_clusters=3"):
        cluster_by_index(_embeddings(x, target), 3, seed=0, within="class")


def test_embeddings_at_a_layer_are_its_output_averaged_over_positions(tiny_synthetic):
    torch.manual_seed(0)
    model, dm = ShortcutClassifier("test_resnet").eval(), tiny_synthetic()
    dm.setup("fit")
    layer = model.get_submodule("net.layer1")
    embedded = collect_embeddings(model, dm.dataloader("val"), find_head(model), "test", layer=layer)
    images = torch.stack([dm.dataset("val")[i]["image"] for i in range(len(dm.dataset("val")))])
    with torch.no_grad():
        expected = model.net.layer1(model.net.maxpool(model.net.act1(model.net.bn1(model.net.conv1(images)))))
    torch.testing.assert_close(embedded.features, expected.mean((2, 3)), atol=1e-5, rtol=1e-4)


def test_mask_learning_on_clusters_within_class_at_a_layer(tmp_path, tiny_synthetic):
    torch.manual_seed(0)
    pruning = MaskPruning(
        prune_epochs=1,
        num_clusters=3,
        cluster_within="class",
        cluster_layer="net.layer3",
        report_splits=("val",),
    )
    trainer = make_trainer(tmp_path, [pruning], 1, limit_val_batches=0)
    trainer.fit(ShortcutClassifier("test_resnet"), datamodule=tiny_synthetic())
    report = json.loads((tmp_path / "prusc.json").read_text())
    assert len(report["clusters"]) == 6  # 3 in each of the 2 classes
    assert all(sum(1 for n in row["classes"].values() if n) == 1 for row in report["clusters"])
    assert report["parameters"]["cluster_layer"] == "net.layer3"
    weights = trainer.train_dataloader.sampler.weights
    per_cluster = torch.zeros(6, dtype=torch.float64).index_add_(0, pruning.clusters, weights)
    torch.testing.assert_close(per_cluster, torch.ones(6, dtype=torch.float64))


def test_bad_cluster_arguments_name_the_field(tmp_path, tiny_synthetic):
    with pytest.raises(ShortcutError, match="cluster_within must be one of 'split', 'class', got 'group'"):
        MaskPruning(cluster_within="group")
    trainer = make_trainer(tmp_path, [MaskPruning(start_epoch=2, cluster_layer="net.layer9")], 3)
    with pytest.raises(ModelError, match=r"cluster_layer 'net\.layer9' is not a module"):
        trainer.fit(ShortcutClassifier("test_resnet"), datamodule=tiny_synthetic())
    assert trainer.global_step == 0  # refused before the ERM epochs that precede the stage


@pytest.mark.parametrize("finetune_split", ["train", "val"])
def test_no_mask_epoch_fine_tunes_on_the_clusters_alone(tmp_path, tiny_synthetic, finetune_split):
    """``prune_epochs=0``: the clusters' fine-tuning from the first epoch, cluster-balanced on the clustered split,
    no weight pruned; the stage stops after its fine-tuning epochs."""
    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet")
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith("weight")}
    pruning = MaskPruning(
        prune_epochs=0,
        finetune_epochs=2,
        finetune_split=finetune_split,
        num_clusters=3,
        report_splits=("val",),
    )
    trainer = make_trainer(tmp_path, [MaskDump(str(tmp_path)), pruning], 5, limit_val_batches=0)
    trainer.fit(model, datamodule=tiny_synthetic())
    dumped = torch.load(tmp_path / "masks_rank0.pt")
    assert sorted(dumped["drawn"]) == [0, 1]  # 2 epochs of the 5, both fine-tuning
    assert all(bool(mask.all()) for mask in dumped["masks"].values())  # nothing pruned
    after = model.state_dict()  # exported: the masks (all kept) multiplied in, a plain network again
    assert after.keys() >= before.keys()
    assert any(not torch.equal(v, after[k]) for k, v in before.items())  # the weights were trained
    if finetune_split == "train":  # cluster-balanced draws over train: every cluster carries the same weight
        weights = trainer.train_dataloader.sampler.weights
        per_cluster = torch.zeros(3, dtype=torch.float64).index_add_(0, pruning.clusters, weights)
        torch.testing.assert_close(per_cluster, torch.ones(3, dtype=torch.float64))
    else:  # the validation split from the first epoch on
        n_val, drawn = len(tiny_synthetic().dataset("val")), dumped["drawn"][0]
        assert max(drawn) < n_val and len(set(drawn)) == n_val
    with pytest.raises(ShortcutError, match="prune_epochs must be >= 1, or 0 with finetune_epochs >= 1"):
        MaskPruning(prune_epochs=0)
