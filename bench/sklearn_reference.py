"""A plain scikit-learn DFR on the photo benchmark, independent of shortcut_lightning's refit code: the photo
table's reference row beside DFR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shortcut_lightning import ShortcutClassifier
from shortcut_lightning.data import Waterbirds


def _embed(model: ShortcutClassifier, dm: Waterbirds, split: str) -> tuple[np.ndarray, np.ndarray]:
    feats, groups = [], []
    with torch.no_grad():
        for batch in dm.dataloader(split):
            feats.append(model.features(batch["image"]))
            groups.append(batch["group"])
    return torch.cat(feats).numpy(), torch.cat(groups).numpy()


WEIGHTS = "balanced"  # recorded with each result: a cached result without it predates the weights below


def balanced_weights(groups: np.ndarray) -> np.ndarray:
    """Sample weights that give every present group the same total and average 1 (scikit-learn's "balanced"
    convention, ``n / (n_groups * count)``), so that ``C`` means what it means unweighted. Weights of
    ``1 / count`` sum to the number of groups and shrink the data term against the L2 penalty by about the
    group size (an effective ``C`` 150x smaller on the photo benchmark's val split)."""
    counts = np.bincount(groups)
    return len(groups) / (np.count_nonzero(counts) * counts[groups])


def sklearn_reference(ckpt: str, backbone: str, root: Path, image_size: int) -> dict[str, float | str]:
    """Standardised embeddings, logistic regression (``C=0.1``) on val with group-balanced sample weights;
    test worst-group and mean accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    model = ShortcutClassifier(backbone, num_classes=2, weights=ckpt).eval()
    dm = Waterbirds(root=str(root), image_size=image_size, num_workers=2, batch_size=64)
    dm.setup("fit")
    dm.setup("test")
    x_val, g_val = _embed(model, dm, "val")
    x_test, g_test = _embed(model, dm, "test")
    n_spurious = dm.n_spurious
    scaler = StandardScaler().fit(x_val)
    clf = LogisticRegression(C=0.1, max_iter=5000)
    clf.fit(scaler.transform(x_val), g_val // n_spurious, sample_weight=balanced_weights(g_val))
    correct = clf.predict(scaler.transform(x_test)) == g_test // n_spurious
    accs = [float(correct[g_test == g].mean()) for g in range(dm.num_groups) if (g_test == g).any()]
    return {"wga": min(accs), "mean": float(correct.mean()), "weights": WEIGHTS}
