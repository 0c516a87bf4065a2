"""The real-photo benchmark builder on a tiny fake source tree (tests never call apt)."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from shortcut_lightning.data import Waterbirds
from shortcut_lightning.data.photos import ANIMALS, BACKGROUNDS, PACKAGES, build_photos, main
from shortcut_lightning.errors import DataError

SIZES = {"image_size": 48, "n_train": 60, "n_val": 16, "n_test": 16}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Every cut-out a small RGBA disc, every background a small striped photo, at the packages' paths."""
    root = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    for c, files in enumerate(ANIMALS.values()):
        for rel in files:
            image = Image.new("RGBA", (30, 24), (0, 0, 0, 0))
            ImageDraw.Draw(image).ellipse((3, 2, 27, 22), fill=(200 * c, 90, 40 + 5 * len(rel) % 200, 255))
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            image.save(root / rel)
    for a, rels in enumerate(BACKGROUNDS.values()):
        for rel in rels:
            path = root / rel if rel.endswith(".jpg") else root / rel / "contents" / "images" / "200x80.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 60, (80, 200, 3)) + np.array([0, 120 * (1 - a), 150 * a])
            pixels[:, ::40] = 255  # a vertical line every 40 px: each strip of 40 px is recognisable
            Image.fromarray(pixels.astype(np.uint8)).save(path, quality=95)
    return root


def _build(sources, out, **kwargs):
    return build_photos(out, sources, **{**SIZES, **kwargs})


def test_the_protocol_holds(sources, tmp_path):
    out = _build(sources, tmp_path / "photos")
    table = pd.read_csv(out / "metadata.csv")
    assert list(table.columns[:7]) == ["img_id", "img_filename", "y", "split", "place", "place_filename",
                                       "place_strip"]  # fmt: skip
    train, val, test = (table[table.split == s] for s in (0, 1, 2))
    assert (len(train), len(val), len(test)) == (60, 16, 16)
    assert (train.y == train.place).mean() == pytest.approx(0.95, abs=0.03)  # the spurious correlation
    assert (train.y == 0).mean() == pytest.approx(0.77, abs=0.03)  # imbalanced classes
    for split in (val, test):
        assert split.groupby(["y", "place"]).size().tolist() == [4, 4, 4, 4]
    # no background strip serves two splits
    used = table.groupby(["place_filename", "place_strip"]).split.nunique()
    assert (used == 1).all()
    # masks mark the animal: the image differs from the pure background there
    row = test.iloc[0]
    mask = np.asarray(Image.open(out / row.mask_filename)) > 127
    image = np.asarray(Image.open(out / row.img_filename)).astype(int)
    assert 0.02 < mask.mean() < 0.6
    assert image[mask][:, 0].mean() != pytest.approx(image[~mask][:, 0].mean(), abs=20)


def test_the_build_is_a_function_of_the_seed(sources, tmp_path):
    one, two = _build(sources, tmp_path / "a"), _build(sources, tmp_path / "b")
    other = _build(sources, tmp_path / "c", seed=1)
    assert (one / "metadata.csv").read_bytes() == (two / "metadata.csv").read_bytes()
    assert (one / "hoofed" / "00000.jpg").read_bytes() == (two / "hoofed" / "00000.jpg").read_bytes()
    assert (one / "metadata.csv").read_bytes() != (other / "metadata.csv").read_bytes()


def test_disjoint_animals_never_share_a_cut_out_between_splits(sources, tmp_path):
    table = pd.read_csv(_build(sources, tmp_path / "d", animals="disjoint") / "metadata.csv")
    assert (table.groupby("animal").split.nunique() == 1).all()
    shared = pd.read_csv(_build(sources, tmp_path / "s") / "metadata.csv")
    assert (shared.groupby("animal").split.nunique() > 1).any()


def test_the_waterbirds_reader_loads_it_with_masks(sources, tmp_path):
    out = _build(sources, tmp_path / "photos")
    dm = Waterbirds(root=str(out), image_size=32, batch_size=8, num_workers=0)
    dm.setup("fit")
    batch = next(iter(dm.dataloader("train")))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["mask"].shape == (8, 1, 32, 32)
    assert 0.3 < batch["mask"].float().mean() < 0.98  # the spurious region is the background
    assert dm.group_counts("val").tolist() == [4, 4, 4, 4]


def test_bad_sources_are_named(sources, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sources, broken)
    rel = ANIMALS["clawed"][0]
    (broken / rel).write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"badger\.png is unreadable"):
        _build(broken, tmp_path / "x")
    (broken / rel).unlink()
    with pytest.raises(DataError, match=r"badger\.png is missing"):
        _build(broken, tmp_path / "y")
    opaque = broken / ANIMALS["hoofed"][0]
    Image.new("RGBA", (10, 10), (1, 2, 3, 255)).save(opaque)
    with pytest.raises(DataError, match=r"bison\.png has no transparent background"):
        _build(broken, tmp_path / "z")


def test_without_apt_the_error_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SystemExit) as stop:
        main(["photos", "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"apt-get download {PACKAGES[0]}" in error
