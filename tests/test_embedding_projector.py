"""EmbeddingProjector: projector files, the 2-D map, the silhouette numbers, a module of the user's own."""

from __future__ import annotations

import csv
import json

import lightning as L
import numpy as np
import pytest
import torch
import torchvision
from lightning.pytorch.loggers import TensorBoardLogger

from shortcut_lightning import ShortcutClassifier
from shortcut_lightning.callbacks import EmbeddingProjector
from shortcut_lightning.callbacks.embedding_projector import silhouette_scores, subsample
from shortcut_lightning.errors import ShortcutError

from helpers import make_trainer


class PlainResNet(L.LightningModule):
    """A module that knows nothing of shortcut_lightning: torchvision's ResNet-18, logits out."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def validation_step(self, batch, batch_idx):
        return self(batch["image"])


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    return make_trainer(
        tmp_path, logger=TensorBoardLogger(save_dir=tmp_path), enable_model_summary=False, **kwargs
    )


def _read_csv(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_fit_writes_projector_map_and_table(tiny_synthetic, tmp_path):
    L.seed_everything(0)
    dm = tiny_synthetic()
    projector = EmbeddingProjector(split="val", method="pca")
    # one epoch, two training steps: a test_resnet step costs ~2 s on a busy 2-core CPU
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[projector])
    trainer.fit(ShortcutClassifier("test_resnet"), datamodule=dm)
    log_dir = tmp_path / "lightning_logs" / "version_0"
    assert (log_dir / "projector_config.pbtxt").is_file()
    config = (log_dir / "projector_config.pbtxt").read_text()
    assert "val_penultimate" in config and "sprite" in config
    (metadata,) = log_dir.glob(f"{trainer.global_step:05d}/val_penultimate/metadata.tsv")
    lines = metadata.read_text().splitlines()
    assert lines[0].split("\t") == ["group", "class", "spurious", "index"]
    rows = [line.split("\t") for line in lines[1:]]
    assert len(rows) == 37
    val = dm.dataset("val")
    assert [r[0] for r in rows] == [dm.group_names[int(g)] for g in val.groups]
    assert [int(r[3]) for r in rows] == list(range(37))
    assert (metadata.parent / "sprite.png").is_file() and (metadata.parent / "tensors.tsv").is_file()

    assert (log_dir / "embeddings_val.png").stat().st_size > 0
    table = _read_csv(log_dir / "embeddings_val.csv")
    assert len(table) == 37 and list(table[0]) == ["index", "group", "target", "spurious", "x", "y"]
    coords = np.array([[float(r["x"]), float(r["y"])] for r in table])
    assert np.isfinite(coords).all() and coords.std(axis=0).min() > 0
    assert [int(r["group"]) for r in table] == val.groups.tolist()

    summary = json.loads((log_dir / "embeddings_val.json").read_text())
    assert summary["n_samples"] == 37 and summary["method"] == "pca"
    assert summary["global_step"] == trainer.global_step
    assert projector.result["spurious_silhouette"] == summary["spurious_silhouette"]
    assert -1 <= summary["class_silhouette"] <= 1


def test_silhouette_separates_clustered_from_random_spurious_features():
    rng = np.random.default_rng(0)
    n = 400
    target = rng.integers(0, 2, n)
    spurious = rng.integers(0, 2, n)
    noise = rng.normal(size=(n, 16))
    clustered = noise + 8.0 * np.eye(16)[2 * target + spurious]  # one far-apart cluster per group
    high = silhouette_scores(clustered, target, spurious, ["a", "b"])
    assert high["spurious_silhouette"] > 0.5
    assert set(high["spurious_silhouette_per_class"]) == {"a", "b"}

    random = silhouette_scores(noise, target, spurious)
    assert abs(random["spurious_silhouette"]) < 0.05
    assert abs(random["class_silhouette"]) < 0.05

    # the class clusters, the spurious attribute is noise within them: only the class silhouette is high
    by_class = noise + 8.0 * np.eye(16)[target]
    mixed = silhouette_scores(by_class, target, spurious)
    assert mixed["class_silhouette"] > 0.5 and abs(mixed["spurious_silhouette"]) < 0.05

    # a class with a single spurious value has no spurious silhouette; unknown labels are skipped
    one_value = silhouette_scores(clustered, target, np.where(target == 0, 0, spurious))
    assert one_value["spurious_silhouette_per_class"]["0"] is None
    assert one_value["spurious_silhouette"] == one_value["spurious_silhouette_per_class"]["1"]
    assert silhouette_scores(noise, target, -np.ones(n))["spurious_silhouette"] is None


def test_subsample_is_seeded_and_sorted():
    a, b = subsample(100, 10, seed=3), subsample(100, 10, seed=3)
    assert torch.equal(a, b) and len(a) == 10 and torch.equal(a, a.sort().values)
    assert not torch.equal(a, subsample(100, 10, seed=4))
    assert torch.equal(subsample(5, 10, seed=0), torch.arange(5))


def test_project_on_a_plain_module_finds_the_last_linear(tiny_synthetic, tmp_path):
    torch.manual_seed(0)
    dm = tiny_synthetic()
    projector = EmbeddingProjector(split="test", max_samples=20, method="pca", thumbnails=False)
    result = projector.project(_trainer(tmp_path), PlainResNet(), datamodule=dm)
    assert result["n_samples"] == 20 and result["split"] == "test"
    log_dir = tmp_path / "lightning_logs" / "version_0"
    table = _read_csv(log_dir / "embeddings_test.csv")
    expected = subsample(41, 20, seed=0).tolist()
    assert [int(r["index"]) for r in table] == expected
    (tensors,) = log_dir.glob("00000/test_penultimate/tensors.tsv")
    assert len(tensors.read_text().splitlines()[0].split("\t")) == 512  # the input of resnet18's fc


def test_validate_runs_tsne_with_thumbnails_once(tiny_synthetic, tmp_path):
    torch.manual_seed(0)
    dm = tiny_synthetic()
    projector = EmbeddingProjector(split="val", method="tsne")
    trainer = _trainer(tmp_path, callbacks=[projector])
    trainer.validate(PlainResNet(), datamodule=dm)
    log_dir = tmp_path / "lightning_logs" / "version_0"
    assert projector.result["method"] == "tsne" and projector.result["n_samples"] == 37
    (sprite,) = log_dir.glob("00000/val_penultimate/sprite.png")
    from PIL import Image

    with Image.open(sprite) as im:
        assert im.size == (7 * 24, 7 * 24)  # ceil(sqrt(37)) = 7 thumbnails a side, 24 px each
    assert (log_dir / "projector_config.pbtxt").read_text().count("tensor_name") == 1


def test_needs_one_of_our_datamodules(tmp_path):
    with pytest.raises(ShortcutError, match=r"datamodule of shortcut_lightning\.data"):
        EmbeddingProjector().project(_trainer(tmp_path), PlainResNet())
    with pytest.raises(ShortcutError, match="method 'umap' is unknown"):
        EmbeddingProjector(method="umap")
