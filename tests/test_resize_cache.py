"""The resized cache: large originals stored once, read back without decoding them, rebuilt when they change."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
import pytest
import torch
from PIL import Image

from shortcut_lightning.data import MetadataDataModule
from shortcut_lightning.data.transforms import denormalize

W, H = 600, 400  # image_size 32: the cache side is 40 and 400 > 1.5 * 40, so every image here is cached


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv(
        "SHORTCUT_LIGHTNING_CACHE", str(tmp_path / "auto_cache")
    )  # never the user's home cache


def photo(seed: int) -> Image.Image:
    """A smooth photo-like image (upsampled noise), so two resampling paths agree closely."""
    small = np.random.default_rng(seed).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((W, H), Image.Resampling.BICUBIC)


def large_folder(tmp_path: Path, masks: bool = True) -> Path:
    """One 600x400 JPEG per group and split (12), with PNG masks of a box in the upper left."""
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for k, (split, y, a) in enumerate((s, y, a) for s in (0, 1, 2) for y in (0, 1) for a in (0, 1)):
        photo(k).save(root / f"img/{k}.jpg", quality=95)
        row = {"img_filename": f"img/{k}.jpg", "y": y, "split": split, "place": a}
        if masks:
            mask = np.zeros((H, W), np.uint8)
            mask[40:200, 60:300] = 255
            Image.fromarray(mask).save(root / f"masks/{k}.png")
            row["mask_filename"] = f"masks/{k}.png"
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root


@pytest.fixture
def opened(monkeypatch):
    """Counts the files PIL opens, by name."""
    counts: Counter[str] = Counter()
    real = PIL.Image.open

    def counting(fp, *args, **kwargs):
        counts[Path(fp).name] += 1
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting)
    return counts


def entries(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.npy")) if folder.exists() else []


def test_setup_caches_the_stage_s_splits_once_and_reads_never_decode_the_originals(tmp_path, opened):
    root, cache = large_folder(tmp_path), tmp_path / "cache"
    dm = MetadataDataModule(
        root=str(root), image_size=32, num_workers=0, augment=False, resize_cache=str(cache)
    )
    dm.setup("fit")
    assert len(entries(cache)) == 16  # train and val: 8 images and their 8 masks; test waits for its stage
    assert all(opened[f"{k}.jpg"] == 1 for k in range(12)), opened  # check and copy in one decode
    opened.clear()
    sample = dm.dataset("train")[0]
    assert sample["image"].shape == (3, 32, 32) and sample["mask"].shape == (1, 32, 32)
    assert not opened, f"a cached read opened {dict(opened)}"
    dm.dataset("test")[0]  # a dataset read outside setup's pass builds its entry on the spot, once
    dm.dataset("test")[0]
    assert opened["8.jpg"] == 1 and len(entries(cache)) == 18
    opened.clear()
    MetadataDataModule(root=str(root), image_size=32, num_workers=0, resize_cache=str(cache)).setup("fit")
    cached = {f"{k}.{ext}" for k in range(8) for ext in ("jpg", "png")}  # train and val
    assert not cached & set(opened), f"a second setup opened {dict(opened)}"  # test files: header check only


def test_a_cached_sample_matches_the_original_s_and_masks_follow(tmp_path):
    root, cache = large_folder(tmp_path), tmp_path / "cache"
    kwargs = {"root": str(root), "image_size": 32, "num_workers": 0, "augment": False}
    cached, direct = (
        MetadataDataModule(**kwargs, resize_cache=str(cache)),
        MetadataDataModule(**kwargs, resize_cache="off"),
    )
    image, mask = cached.dataset("val").load(0)
    assert image.shape == (3, 40, 60) and mask.shape == (1, 40, 60)  # shorter side 40 = ceil(1.25 * 32)
    assert mask[0, 4:20, 6:30].all() and mask.sum() == 16 * 24  # the box, nearest-neighbour at 1/10
    a, b = cached.dataset("val")[0], direct.dataset("val")[0]
    gap = (denormalize(a["image"]) - denormalize(b["image"])).abs()
    assert gap.mean() < 0.01 and gap.max() < 0.1, (gap.mean(), gap.max())
    assert (a["mask"] == b["mask"]).float().mean() > 0.97
    train = cached.dataset("train", augment=True)[0]  # random resized crops read the copy too
    assert train["image"].shape == (3, 32, 32) and train["mask"].shape == (1, 32, 32)


def test_a_changed_file_gets_a_new_entry_and_a_corrupt_entry_is_rebuilt(tmp_path, opened):
    root, cache = large_folder(tmp_path, masks=False), tmp_path / "cache"
    dm = MetadataDataModule(
        root=str(root), image_size=32, num_workers=0, augment=False, resize_cache=str(cache)
    )
    first = dm.dataset("train").load(0)[0]
    assert len(entries(cache)) == 1
    stat = os.stat(root / "img/0.jpg")
    os.utime(root / "img/0.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched
    assert torch.equal(dm.dataset("train").load(0)[0], first) and len(entries(cache)) == 2
    Image.new("RGB", (W, H), (0, 200, 0)).save(root / "img/0.jpg", quality=95)  # rewritten
    rewritten = dm.dataset("train").load(0)[0]
    assert len(entries(cache)) == 3 and abs(int(rewritten[1].float().mean()) - 200) <= 2
    newest = max(entries(cache), key=lambda p: p.stat().st_mtime_ns)
    newest.write_bytes(newest.read_bytes()[:100])  # a truncated entry (a killed writer)
    opened.clear()
    assert torch.equal(dm.dataset("train").load(0)[0], rewritten) and opened["0.jpg"] == 1
    assert np.load(newest).shape == (40, 60, 3)  # rebuilt in place


def test_the_cache_lives_outside_the_data_folder_and_off_caches_nothing(tmp_path, opened):
    root = large_folder(tmp_path)
    files = sorted(p for p in root.rglob("*"))
    dm = MetadataDataModule(root=str(root), image_size=32, num_workers=0)  # resize_cache: auto
    dm.setup("fit")
    dm.dataset("train")[0]
    assert len(entries(tmp_path / "auto_cache")) == 16 and sorted(root.rglob("*")) == files
    off = tmp_path / "off"
    off.mkdir()
    (off / "data").symlink_to(root)
    before = entries(tmp_path)
    dm = MetadataDataModule(root=str(off / "data"), image_size=32, num_workers=0, resize_cache="off")
    dm.setup("fit")
    opened.clear()
    dm.dataset("train")[0]
    dm.dataset("train")[0]
    assert entries(tmp_path) == before and opened["0.jpg"] == 2


def test_a_broken_original_found_while_caching_follows_the_image_check_rules(tmp_path):
    root, cache = large_folder(tmp_path), tmp_path / "cache"
    data = (root / "img/1.jpg").read_bytes()
    (root / "img/1.jpg").write_bytes(data[: len(data) // 3])  # truncated: the header reads, the decode fails
    dm = MetadataDataModule(
        root=str(root),
        image_size=32,
        num_workers=0,
        check_images="exists",
        max_bad_images=0.1,
        resize_cache=str(cache),
    )
    with pytest.warns(UserWarning, match=r"skipped 1 of 12 images .*img/1.jpg \(unreadable \(OSError\)\)"):
        dm.setup("fit")
    assert len(dm.dataset("train")) == 3 and len(entries(cache)) == 14


def test_each_ddp_rank_caches_its_share(tmp_path, monkeypatch):
    import shortcut_lightning.data.file_scan as file_scan

    root, cache = large_folder(tmp_path, masks=False), tmp_path / "cache"
    monkeypatch.setattr(file_scan, "world", lambda: (2, 1))  # rank 1 of 2: files 1, 3, 5, 7 of train and val
    dm = MetadataDataModule(root=str(root), image_size=32, num_workers=0, resize_cache=str(cache))
    dm.setup("fit")
    assert len(entries(cache)) == 4
    reader = dm.dataset("train").reader
    assert [reader.cache.image_entry(root / f"img/{k}.jpg").is_file() for k in range(8)] == [False, True] * 4


def test_cached_copies_and_their_masks_follow_exif_orientation(tmp_path):
    root, cache = large_folder(tmp_path), tmp_path / "cache"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned by 90 degrees
    photo(0).save(root / "img/0.jpg", quality=95, exif=exif)
    Image.open(root / "masks/0.png").save(root / "masks/0.png", exif=exif)
    dm = MetadataDataModule(root=str(root), image_size=32, num_workers=0, resize_cache=str(cache))
    image, mask = dm.dataset("train").load(0)
    assert image.shape == (3, 60, 40) and mask.shape == (1, 60, 40)  # as the camera held it
    assert mask[0, 6:30, -20:-4].all() and mask.sum() == 16 * 24  # the box turned with its image


def test_small_images_are_not_cached_and_every_stage_sets_up(tmp_path, metadata_folder):
    """fit, then test (as the CLI's test after fit does): small images read from the originals, nothing cached.

    The second setup samples headers to decide whether the test split holds large images; it once failed on a
    read-only array there, so every real-data fit crashed at its test pass."""
    cache = tmp_path / "cache"
    dm = MetadataDataModule(
        root=str(metadata_folder()), image_size=32, num_workers=0, resize_cache=str(cache)
    )
    for stage in ("fit", "test", "validate", "predict"):
        dm.setup(stage)
    assert entries(cache) == []
    assert dm.dataset("test")[0]["image"].shape == (3, 32, 32)
