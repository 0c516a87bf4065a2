"""2-D maps of embeddings (t-SNE or PCA) for figures."""

from __future__ import annotations

import numpy as np

from shortcut_lightning.errors import DataError, ShortcutError

METHODS = ("tsne", "pca")


def project_2d(features: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """[N, 2] coordinates of ``features`` [N, D] by t-SNE (PCA initialisation) or PCA, deterministic in ``seed``."""
    if method not in METHODS:
        raise ShortcutError(f"method {method!r} is unknown: choose one of {', '.join(METHODS)}")
    n = len(features)
    if n < 3:
        raise DataError(f"a 2-D map needs at least 3 samples, got {n}")
    x = np.asarray(features, dtype=np.float64)
    if method == "pca":
        from sklearn.decomposition import PCA

        coords = PCA(n_components=min(2, x.shape[1]), random_state=seed).fit_transform(x)
    else:
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits

        perplexity = min(30.0, max(1.0, (n - 1) / 3))  # sklearn needs perplexity < n
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
        # one OpenMP thread: Barnes-Hut's threads spin-wait, and on a busy machine 37 points took 40 s
        # instead of 0.2 s (1000 points: about 5 s either way)
        with threadpool_limits(limits=1, user_api="openmp"):
            coords = tsne.fit_transform(x)
    if coords.shape[1] < 2:  # one-dimensional features
        coords = np.concatenate([coords, np.zeros((n, 1))], axis=1)
    return coords.astype(np.float64)
