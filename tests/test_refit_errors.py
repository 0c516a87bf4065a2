"""Refit splits that cannot be fit are refused in one line, and a non-finite embedding stops its pass."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from shortcut_lightning import (
    AutomaticFeatureReweighting,
    DeepFeatureReweighting,
    MetadataDataModule,
    ShortcutClassifier,
)
from shortcut_lightning.errors import DataError, ModelError
from shortcut_lightning.methods.dfr.last_layer import fit_dfr
from shortcut_lightning.probing.embedding_pass import Embeddings, collect_embeddings

from conftest import write_image
from helpers import make_trainer


def _folder(root, counts: dict[tuple[int, int], tuple[int, int]]):
    """A Waterbirds-schema folder: ``counts[(y, a)] = (n in train, n in val)``; the test split mirrors val."""
    rows, k = [], 0
    for (y, a), (n_train, n_val) in counts.items():
        for split, n in ((0, n_train), (1, n_val), (2, n_val)):
            for _ in range(n):
                name = f"img/{k}.png"
                write_image(root / name, seed=k)
                rows.append({"img_filename": name, "y": y, "split": split, "place": a})
                k += 1
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return MetadataDataModule(root=str(root), image_size=32, batch_size=8, num_workers=0)


def _refit(tmp_path, dm, stage) -> None:
    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet", num_classes=dm.num_classes)
    make_trainer(tmp_path, [stage]).validate(model, datamodule=dm)


def _three_classes(seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(1, 3, 120)  # classes 1 and 2 of three: the refit data lack class 0
    x = rng.normal(size=(120, 6)) + y[:, None]
    return x, y


def test_fit_dfr_refuses_a_fit_without_a_row_per_class():
    """One-vs-rest over two present classes gives one row: it must not become the three rows of the head."""
    x, y = _three_classes()
    with pytest.raises(ModelError, match=r"1 coefficient row\(s\) for a 3-class head.*class\(es\) 1, 2"):
        fit_dfr(x, y, y, x, num_classes=3, num_refits=2)


def test_dfr_callback_refuses_a_refit_split_without_a_class_of_the_head(tmp_path):
    counts = {(0, 0): (4, 0), (0, 1): (4, 0), (1, 0): (4, 3), (1, 1): (4, 3), (2, 0): (4, 3), (2, 1): (4, 3)}
    dm = _folder(tmp_path / "data", counts)
    with pytest.raises(DataError, match=r"DFR refit split 'val' has no sample of class 'y0'.* 3 classes"):
        _refit(tmp_path, dm, DeepFeatureReweighting(num_refits=2, scaler_split=None))


@pytest.mark.parametrize(
    "stage", [DeepFeatureReweighting(num_refits=2, balance="classes"), AutomaticFeatureReweighting()]
)
def test_a_refit_split_with_one_class_is_refused_before_fitting(tmp_path, stage):
    counts = {(0, 0): (4, 3), (0, 1): (4, 3), (1, 0): (4, 0), (1, 1): (4, 0)}
    dm = _folder(tmp_path / "data", counts)
    label = stage.stage_label
    with pytest.raises(DataError, match=rf"^{label} refit split 'val' holds one class \('y0'\)"):
        _refit(tmp_path, dm, stage)


def test_dfr_refuses_a_refit_split_with_one_group():
    """Group balancing over one group balances nothing: named before scikit-learn runs."""
    x, y = _three_classes()
    n = len(y)
    refit = Embeddings(
        features=torch.as_tensor(x, dtype=torch.float32),
        logits=torch.zeros(n, 2),
        target=torch.as_tensor(y - 1),  # two classes, all in one group
        group=torch.zeros(n, dtype=torch.long),
        spurious=torch.zeros(n, dtype=torch.long),
        index=torch.arange(n),
    )
    dm = SimpleNamespace(
        group_names=["y0_a0", "y0_a1", "y1_a0", "y1_a1"], class_names=["y0", "y1"], num_classes=2
    )
    with pytest.raises(DataError, match=r"'val' holds one group \('y0_a0'\).*balance='classes'"):
        DeepFeatureReweighting(scaler_split=None).fit_head(dm, {"val": refit}, nn.Linear(6, 2))


class _NaNForBrightImages(L.LightningModule):
    """Logits through a head; NaN features (hence logits) for every image whose first pixel is positive."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = images.mean((2, 3))
        bright = images[:, 0, 0, 0] > 0
        return self.head(torch.where(bright[:, None], torch.full_like(features, float("nan")), features))


def test_a_non_finite_embedding_stops_the_pass_with_the_count_and_the_fix():
    model = _NaNForBrightImages()
    images = -torch.rand(10, 3, 4, 4)
    images[[1, 4, 7], 0, 0, 0] = 1.0
    loader = [{"image": images[i : i + 4], "index": torch.arange(i, min(i + 4, 10))} for i in (0, 4, 8)]
    message = r"^DFR: embedding val: 3 of 10 samples gave non-finite .*lower learning rate.*32-true\)$"
    for features in ("every_rank", "rank_zero", "none"):
        with pytest.raises(ModelError, match=message):
            collect_embeddings(model, loader, model.head, desc="DFR: embedding val", features=features)
    finite = [{"image": -torch.rand(4, 3, 4, 4), "index": torch.arange(4)}]
    assert len(collect_embeddings(model, finite, model.head, desc="DFR: embedding val").features) == 4
