"""``EmbeddingProjector``: penultimate embeddings of a split in TensorBoard's projector and as a 2-D map.

"An XAI-based Analysis of Shortcut Learning in Neural Networks" (Le et al.) observes that an ERM model's
representations cluster by the spurious attribute. This callback shows it (a 2-D scatter coloured by group,
the projector with thumbnails) and measures it (:func:`silhouette_scores`: how well the spurious attribute
separates the samples of each class).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from shortcut_lightning.data.base import require_group_datamodule
from shortcut_lightning.data.samplers import world
from shortcut_lightning.data.transforms import denormalize
from shortcut_lightning.errors import DataError, ShortcutError
from shortcut_lightning.probing.embedding_pass import Embeddings, collect_embeddings
from shortcut_lightning.probing.model_parts import find_head
from shortcut_lightning.reporting.figures import new_figure
from shortcut_lightning.reporting.projection import METHODS, project_2d

METADATA_HEADER = ["group", "class", "spurious", "index"]
SPRITE_SIDE = 8192  # TensorBoard's projector refuses sprites larger than this many pixels a side
SILHOUETTE_SPACE = "penultimate features, euclidean"


def subsample(n: int, max_samples: int | None, seed: int) -> Tensor:
    """Sorted row numbers of at most ``max_samples`` of ``n`` rows, drawn by a generator seeded with ``seed``."""
    if max_samples is None or n <= max_samples:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:max_samples].sort().values


def _silhouette(x: np.ndarray, labels: np.ndarray) -> float | None:
    """sklearn's silhouette score, or ``None`` where it is undefined (fewer than 2 or n labels)."""
    from sklearn.metrics import silhouette_score

    keep = labels >= 0
    x, labels = x[keep], labels[keep]
    k = len(np.unique(labels))
    if k < 2 or k >= len(labels):
        return None
    return float(silhouette_score(x, labels, metric="euclidean"))


def silhouette_scores(
    features: Tensor | np.ndarray,
    target: Tensor | np.ndarray,
    spurious: Tensor | np.ndarray,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """How well the spurious attribute and the class separate the embeddings (silhouette, -1 to 1).

    Computed on the full features given (the callback passes the penultimate embeddings, not the 2-D
    map, so the numbers do not depend on t-SNE's distortions), with euclidean distance.

    Returns ``spurious_silhouette``: the silhouette of the spurious labels among the samples of each
    class, averaged over the classes where it is defined (two or more spurious values present), near 1
    when the representation clusters by the spurious attribute (the observation of the XAI-based analysis),
    near 0 when it ignores it; ``spurious_silhouette_per_class``; and ``class_silhouette``: the silhouette of the class
    labels over all samples. Labels of -1 (unknown) are left out; an undefined score is ``None``.
    """
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    y = np.asarray(target).astype(np.int64)
    a = np.asarray(spurious).astype(np.int64)
    per_class: dict[str, float | None] = {}
    for c in np.unique(y[y >= 0]):
        rows = y == c
        name = class_names[c] if class_names is not None and c < len(class_names) else str(int(c))
        per_class[name] = _silhouette(x[rows], a[rows])
    defined = [v for v in per_class.values() if v is not None]
    return {
        "spurious_silhouette": float(np.mean(defined)) if defined else None,
        "spurious_silhouette_per_class": per_class,
        "class_silhouette": _silhouette(x, y),
        "silhouette_space": SILHOUETTE_SPACE,
    }


def thumbnails_of(
    dataset: Any, rows: Sequence[int], size: int, batch_size: int = 64, num_workers: int = 0
) -> Tensor:
    """[N, 3, size, size] images of ``dataset`` rows in [0, 1], ImageNet normalisation undone."""
    loader = DataLoader(Subset(dataset, list(rows)), batch_size=batch_size, num_workers=num_workers)
    out = []
    for batch in loader:
        images = batch["image"].float()
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        images = denormalize(images[:, :3])
        images = F.interpolate(
            images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out.append(images.clamp(0, 1))  # antialiasing can overshoot
    return torch.cat(out) if out else torch.empty(0, 3, size, size)


class EmbeddingProjector(Callback):
    """Penultimate embeddings of one split: TensorBoard projector, a 2-D scatter by group, silhouettes.

    Embeds up to ``max_samples`` samples of ``split`` (a seeded, deterministic draw) with evaluation
    transforms in eval mode; the embedding is the input of the classification head. Then, in the log
    directory:

    - the TensorBoard projector (every ``TensorBoardLogger``): tag ``<split>_penultimate``, metadata
      columns group, class, spurious, index, and image thumbnails;
    - ``embeddings_<split>.png``: the t-SNE or PCA map coloured by group (also logged with ``add_figure``);
    - ``embeddings_<split>.csv``: index, group, target, spurious, x, y (group ids, 2-D coordinates);
    - ``embeddings_<split>.json``: the silhouettes of :func:`silhouette_scores` (on the full
      penultimate features), also logged as ``embeddings/<split>/<name>`` metrics.

    Runs at the end of ``fit`` and once at the end of ``validate``/``test``; :meth:`project` does the
    work and can be called on its own. Under DDP every rank embeds its shard of the draw, the shards
    are gathered, rank 0 draws the map and writes; all ranks return the same result.

    Needs a datamodule of ``shortcut_lightning.data`` and a model whose ``forward(images)`` returns
    logits through a findable head (timm ``get_classifier()``, the last ``nn.Linear``, or ``head``).

    Args:
        split: which split of the datamodule to embed.
        max_samples: at most this many samples (``None``: all of the split).
        method: ``tsne`` (sklearn, ``init="pca"``, fixed seed) or ``pca``.
        thumbnails: attach small images to the projector's points.
        thumbnail_size: side of the thumbnails in pixels.
        seed: seed of the subsample and of t-SNE.
        head: dotted path of the head when it cannot be found.

    Example::

        import lightning as L
        from shortcut_lightning import ShortcutClassifier
        from shortcut_lightning.callbacks import EmbeddingProjector
        from shortcut_lightning.data import SyntheticShortcuts

        dm = SyntheticShortcuts(n_train=96, n_val=37, n_test=41, image_size=32, batch_size=16)
        trainer = L.Trainer(max_epochs=1, callbacks=[EmbeddingProjector(split="val", method="pca")])
        trainer.fit(ShortcutClassifier("test_resnet"), datamodule=dm)
        # lightning_logs/version_0/embeddings_val.{png,csv,json} and the projector in TensorBoard
    """

    def __init__(
        self,
        split: str = "train",
        max_samples: int | None = 1000,
        method: str = "tsne",
        thumbnails: bool = True,
        thumbnail_size: int = 24,
        seed: int = 0,
        head: str | None = None,
    ) -> None:
        if method not in METHODS:
            raise ShortcutError(f"method {method!r} is unknown: choose one of {', '.join(METHODS)}")
        if max_samples is not None and max_samples < 3:
            raise ShortcutError(f"max_samples must be at least 3 (or None for all), got {max_samples}")
        if thumbnail_size < 1:
            raise ShortcutError(f"thumbnail_size must be at least 1, got {thumbnail_size}")
        self.split = split
        self.max_samples = max_samples
        self.method = method
        self.thumbnails = thumbnails
        self.thumbnail_size = thumbnail_size
        self.seed = seed
        self.head_path = head
        self.result: dict[str, Any] = {}

    # -- when ----------------------------------------------------------------------------------
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.project(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self.project(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the test pass right after fit sees the model projected at the end of fit: skip it
        if trainer.state.fn == "test" and self.result.get("global_step") != trainer.global_step:
            self.project(trainer, pl_module)

    # -- what ----------------------------------------------------------------------------------
    def project(
        self, trainer: L.Trainer, pl_module: L.LightningModule, datamodule: Any = None
    ) -> dict[str, Any]:
        """Embed the draw of ``split``, write the projector, map, CSV and JSON; return the summary.

        ``datamodule`` defaults to ``trainer.datamodule``. Every DDP rank must call this (it gathers).
        """
        dm = require_group_datamodule(
            datamodule or getattr(trainer, "datamodule", None), "EmbeddingProjector"
        )
        dataset = dm.dataset(self.split)  # an unknown split is a DataError naming the splits
        rows = subsample(len(dataset), self.max_samples, self.seed)
        if len(rows) < 3:
            raise DataError(
                f"EmbeddingProjector needs at least 3 samples in split {self.split!r}, it has {len(rows)}"
            )
        replicas, rank = world()
        loader = dm.dataloader(self.split, sampler=rows[rank::replicas].tolist())
        head = find_head(pl_module, self.head_path)
        emb = collect_embeddings(  # rank 0 alone projects and writes: no other rank holds the features
            pl_module, loader, head, desc=f"EmbeddingProjector: embedding {self.split}", features="rank_zero"
        )
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank asks
        result, failure, error = None, None, None
        if trainer.is_global_zero:
            try:
                result = self._summarise(trainer, dm, emb, dataset, log_dir)
            except Exception as exc:  # tell the other ranks instead of leaving them waiting in broadcast
                failure, error = exc, f"{type(exc).__name__}: {exc}"
        result, error = trainer.strategy.broadcast((result, error), src=0)
        if failure is not None:
            raise failure
        if error is not None:
            raise ShortcutError(f"EmbeddingProjector failed on rank 0: {error}")
        self.result = result
        return result

    def _summarise(
        self, trainer: L.Trainer, dm: Any, emb: Embeddings, dataset: Any, log_dir: Path
    ) -> dict[str, Any]:
        """Rank 0: the 2-D map, the silhouettes and every file and logger write."""
        features = emb.features.numpy()
        coords = project_2d(features, self.method, self.seed)
        step = trainer.global_step
        result: dict[str, Any] = {
            "split": self.split,
            "method": self.method,
            "n_samples": len(emb),
            "global_step": step,
            **silhouette_scores(features, emb.target, emb.spurious, list(dm.class_names)),
        }
        log_dir.mkdir(parents=True, exist_ok=True)
        stem = f"embeddings_{self.split}"
        self._write_csv(log_dir / f"{stem}.csv", emb, coords)
        figure = self._figure(dm, emb, coords, step, result)
        figure.savefig(log_dir / f"{stem}.png", dpi=100)
        result["files"] = {k: str(log_dir / f"{stem}.{k}") for k in ("png", "csv", "json")}
        (log_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
        self._log(trainer, dm, emb, dataset, figure, result)
        return result

    @staticmethod
    def _write_csv(path: Path, emb: Embeddings, coords: np.ndarray) -> None:
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "group", "target", "spurious", "x", "y"])
            for i in range(len(emb)):
                writer.writerow(
                    [
                        int(emb.index[i]),
                        int(emb.group[i]),
                        int(emb.target[i]),
                        int(emb.spurious[i]),
                        f"{coords[i, 0]:.6g}",
                        f"{coords[i, 1]:.6g}",
                    ]
                )

    def _figure(self, dm: Any, emb: Embeddings, coords: np.ndarray, step: int, result: dict[str, Any]) -> Any:
        figure = new_figure(7, 6)
        ax = figure.add_subplot()
        names = list(dm.group_names)
        groups = emb.group.numpy()
        cmap = _colour_map(len(names))
        for g in sorted(set(groups.tolist())):
            rows = groups == g
            ax.scatter(
                coords[rows, 0], coords[rows, 1], s=12, alpha=0.8, color=cmap(g), label=_lookup(names, g)
            )
        ax.legend(title="group", fontsize=8, markerscale=1.5, loc="best")
        ax.set_xticks([])
        ax.set_yticks([])
        sil = result["spurious_silhouette"]
        cls = result["class_silhouette"]
        ax.set_title(
            f"{self.split} penultimate embeddings, {self.method.upper()}, step {step} (n={len(emb)})\n"
            f"silhouette: spurious within class {_fmt(sil)}, class {_fmt(cls)}",
            fontsize=10,
        )
        figure.tight_layout()
        return figure

    def _log(
        self, trainer: L.Trainer, dm: Any, emb: Embeddings, dataset: Any, figure: Any, result: dict[str, Any]
    ) -> None:
        scalars = {
            f"embeddings/{self.split}/{k}": result[k]
            for k in ("spurious_silhouette", "class_silhouette")
            if result[k] is not None
        }
        for logger in trainer.loggers:
            if scalars:
                logger.log_metrics(scalars, step=trainer.global_step)
        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not tensorboards:
            return
        group_names = list(dm.group_names)
        class_names = list(dm.class_names)
        spurious_names = list(getattr(dm, "spurious_names", []))
        metadata = [
            [
                _lookup(group_names, int(emb.group[i])),
                _lookup(class_names, int(emb.target[i])),
                _lookup(spurious_names, int(emb.spurious[i])),
                str(int(emb.index[i])),
            ]
            for i in range(len(emb))
        ]
        thumbs = None
        if self.thumbnails and (emb.index >= 0).all():
            side = min(self.thumbnail_size, SPRITE_SIDE // math.ceil(math.sqrt(len(emb))))
            thumbs = thumbnails_of(
                dataset,
                emb.index.tolist(),
                max(side, 1),
                getattr(dm, "batch_size", 64),
                getattr(dm, "num_workers", 0),
            )
        for logger in tensorboards:
            experiment = logger.experiment
            experiment.add_embedding(
                emb.features,
                metadata=metadata,
                metadata_header=METADATA_HEADER,
                label_img=thumbs,
                tag=f"{self.split}_penultimate",
                global_step=trainer.global_step,
            )
            experiment.add_figure(
                f"embeddings/{self.split}", figure, global_step=trainer.global_step, close=False
            )
            experiment.flush()


def _lookup(names: Sequence[str], i: int) -> str:
    """``names[i]``; ``unknown`` for a missing label (-1); the id itself past the list."""
    if i < 0:
        return "unknown"
    return str(names[i]) if i < len(names) else str(i)


def _colour_map(n: int) -> Any:
    from matplotlib import colormaps

    base = colormaps["tab10" if n <= 10 else "tab20"]
    return lambda g: "0.5" if g < 0 else base(g % base.N)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
