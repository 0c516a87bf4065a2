"""Shared fixtures: tiny synthetic data and on-disk metadata folders written by the tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
# under pytest-xdist (make test: 2 workers) each worker gets one core: two threads each would oversubscribe the
# cores, and OpenMP's spinning threads then slow every test several times over
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

TINY = {"n_train": 96, "n_val": 37, "n_test": 41, "image_size": 32, "batch_size": 16}


@pytest.fixture
def tiny_synthetic():
    from shortcut_lightning.data import SyntheticShortcuts

    def make(**kwargs):
        return SyntheticShortcuts(**{**TINY, **kwargs})

    return make


def write_image(path: Path, size: int = 20, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(path)


def write_mask(path: Path, size: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((size, size + 4), dtype=np.uint8)
    mask[: size // 2] = 255
    Image.fromarray(mask).save(path)


@pytest.fixture
def metadata_folder(tmp_path):
    """A Waterbirds-schema folder: 4 groups in every split, masks for every image."""

    def make(schema: str = "waterbirds", masks: bool = True, per_group: int = 3) -> Path:
        root = tmp_path / f"data_{schema}"
        rows = []
        k = 0
        for split in (0, 1, 2):
            for y in (0, 1):
                for a in (0, 1):
                    for _ in range(per_group):
                        name = f"img/{split}_{y}{a}_{k}.png"
                        write_image(root / name, seed=k)
                        row = {"y": y, "split": split}
                        if schema == "waterbirds":
                            row.update(img_filename=name, place=a)
                        else:
                            row.update(filename=name, a=a)
                        if masks:
                            row["mask_filename"] = f"masks/{k}.png"
                            write_mask(root / row["mask_filename"])
                        rows.append(row)
                        k += 1
        import pandas as pd

        pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
        return root

    return make
