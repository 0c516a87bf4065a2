"""The real-photo benchmark builder on a tiny fake source tree (tests never call apt)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw, ImageFilter

from shortcut_lightning.data import MetadataDataModule, Waterbirds
from shortcut_lightning.data.photo_variants import PATCH
from shortcut_lightning.data.photos import ANIMALS, BACKGROUNDS, PACKAGES, STRIPS, build_photos, main
from shortcut_lightning.errors import DataError

SIZES = {"image_size": 64, "n_train": 60, "n_val": 16, "n_test": 16}
COLUMNS = [
    "img_id",
    "img_filename",
    "y",
    "split",
    "place",
    "place_filename",
    "place_strip",
    "place_box",
    "place_flip",
    "animal",
    "mask_filename",
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Every cut-out a small RGBA ellipse (magenta or yellow: far from any background), every background a
    small noisy green (land) or blue (water) photo, at the packages' paths."""
    root = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    for c, files in enumerate(ANIMALS.values()):
        for k, rel in enumerate(files):
            image = Image.new("RGBA", (30, 24), (0, 0, 0, 0))
            ImageDraw.Draw(image).ellipse(
                (1 + k % 4, 2, 28, 22 - k % 3), fill=(255, 255 * c, 255 * (1 - c), 255)
            )
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


@pytest.fixture(scope="module")
def built(sources, tmp_path_factory):
    return _build(sources, tmp_path_factory.mktemp("built") / "photos")


def _photos(built):
    """build.json's background photos by their place_filename."""
    record = json.loads((built / "build.json").read_text())
    return {photo["place_filename"]: photo for photo in record["background_photos"]}


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_metadata_follows_the_group_dro_layout(built):
    table = pd.read_csv(built / "metadata.csv")
    assert list(table.columns) == COLUMNS
    assert set(table.split) == {0, 1, 2} and set(table.y) == {0, 1} and set(table.place) == {0, 1}
    assert table.img_id.is_unique and table.img_filename.str.match(r"(hoofed|clawed)/\d{5}\.jpg$").all()
    assert all((built / p).is_file() for p in (*table.img_filename, *table.mask_filename))
    with Image.open(built / table.img_filename[0]) as image:
        assert (image.format, image.size) == ("JPEG", (64, 64))
    record = json.loads((built / "build.json").read_text())
    assert (record["seed"], record["n_train"], record["n_val"], record["n_test"]) == (0, 60, 16, 16)
    assert record["counts"]["test"] == {
        "hoofed_land": 4,
        "hoofed_water": 4,
        "clawed_land": 4,
        "clawed_water": 4,
    }


def test_train_is_correlated_and_imbalanced_val_and_test_are_balanced(built):
    table = pd.read_csv(built / "metadata.csv")
    train, val, test = (table[table.split == s] for s in (0, 1, 2))
    assert (len(train), len(val), len(test)) == (60, 16, 16)
    assert (train.y == train.place).mean() == pytest.approx(0.95, abs=0.03)  # the spurious correlation
    assert (train.y == 0).mean() == pytest.approx(0.77, abs=0.03)  # imbalanced classes
    assert train.groupby(["y", "place"]).size().min() >= 1  # every group present in train
    for split in (val, test):
        assert split.groupby(["y", "place"]).size().tolist() == [4, 4, 4, 4]


def test_no_background_pixel_is_shared_between_splits(built):
    table = pd.read_csv(built / "metadata.csv")
    photos = _photos(built)
    assert set(table.place_filename) <= set(photos) and len(photos) == 12
    for photo in photos.values():  # 3 strips train, 1 val, 1 test, each strip in one split
        strips = photo["strips"]
        assert (len(strips["train"]), len(strips["val"]), len(strips["test"])) == (3, 1, 1)
        assert sorted(strips["train"] + strips["val"] + strips["test"]) == list(range(STRIPS))
    for row in table.itertuples():
        photo = photos[row.place_filename]
        width, height = photo["size"]
        assert row.place_strip in photo["strips"][("train", "val", "test")[row.split]]
        x0, y0, x1, y1 = map(int, row.place_box.split())
        lo, hi = row.place_strip * (width // STRIPS), (row.place_strip + 1) * (width // STRIPS)
        assert lo <= x0 < x1 <= hi and 0 <= y0 < y1 <= height and x1 - x0 == y1 - y0
    assert (table.groupby(["place_filename", "place_strip"]).split.nunique() == 1).all()


def test_masks_mark_the_pasted_animal(built, sources):
    """Where the image differs from its own background crop (rebuilt from place_box), the mask is set."""
    table = pd.read_csv(built / "metadata.csv")
    photos = _photos(built)
    for row in table.iloc[::9].itertuples():
        with Image.open(sources / photos[row.place_filename]["file"]) as photo:
            crop = (
                photo.convert("RGB")
                .crop(tuple(map(int, row.place_box.split())))
                .resize((64, 64), Image.BICUBIC)
            )
        if row.place_flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        with (
            Image.open(built / row.img_filename) as image,
            Image.open(built / row.mask_filename) as mask_image,
        ):
            changed = np.abs(np.asarray(image, int) - np.asarray(crop, int)).sum(axis=2) > 120
            inner = np.asarray(mask_image.filter(ImageFilter.MinFilter(3))) > 127
            outer = np.asarray(mask_image.filter(ImageFilter.MaxFilter(5))) > 127
            assert set(np.unique(np.asarray(mask_image))) == {0, 255}
        assert inner.mean() > 0.03 and changed[inner].mean() > 0.95  # the animal is where the mask is
        assert changed[~outer].mean() < 0.01  # and nowhere else


def test_cut_outs_are_shared_by_default_and_disjoint_on_request(sources, built, tmp_path):
    out = _build(sources, tmp_path / "d", animals="disjoint")
    table = pd.read_csv(out / "metadata.csv")
    assert (table.groupby("animal").split.nunique() == 1).all()
    pools = json.loads((out / "build.json").read_text())["animals_per_split"]
    for c, files in ANIMALS.items():  # every cut-out in exactly one split, about 60/20/20
        sizes = [len(pools[c][s]) for s in ("train", "val", "test")]
        assert sum(sizes) == len(files) == len(set().union(*pools[c].values()))
        assert sizes[0] == round(0.6 * len(files)) and abs(sizes[1] - sizes[2]) <= 1
    shared = pd.read_csv(built / "metadata.csv")
    assert (shared.groupby("animal").split.nunique() > 1).any()


def test_the_build_is_a_function_of_the_seed(sources, built, tmp_path):
    again, other = _build(sources, tmp_path / "a"), _build(sources, tmp_path / "c", seed=1)
    assert _files(again) == _files(built)  # byte-identical: images, masks, metadata.csv, build.json
    assert (built / "metadata.csv").read_bytes() != (other / "metadata.csv").read_bytes()
    assert (built / "hoofed" / "00000.jpg").read_bytes() != (other / "hoofed" / "00000.jpg").read_bytes()


def test_the_waterbirds_reader_loads_it_with_masks(built):
    dm = Waterbirds(root=str(built), image_size=64, batch_size=8, num_workers=0)
    dm.setup("fit")
    batch = next(iter(dm.dataloader("train")))
    assert batch["image"].shape == (8, 3, 64, 64) and batch["mask"].shape == (8, 1, 64, 64)
    assert 0.3 < batch["mask"].float().mean() < 0.98  # the spurious region is the background
    assert dm.group_counts("val").tolist() == [4, 4, 4, 4]
    # mask_marks core: the spurious region is the rest of the image (a centre crop of it at evaluation)
    val = next(iter(dm.dataloader("val")))["mask"].float().mean(dim=(1, 2, 3))
    table = pd.read_csv(built / "metadata.csv")
    animal = [
        np.asarray(Image.open(built / m)).mean() / 255 for m in table[table.split == 1].mask_filename[:8]
    ]
    assert val.numpy() == pytest.approx(1 - np.array(animal), abs=0.15)


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
    shutil.copytree(sources, broken, dirs_exist_ok=True)
    (broken / BACKGROUNDS["water"][-1]).unlink()
    with pytest.raises(DataError, match=r"Aqua\.jpg is missing.*mate-backgrounds"):
        _build(broken, tmp_path / "w")


def test_without_apt_the_error_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SHORTCUT_CACHE", raising=False)
    with pytest.raises(SystemExit) as stop:
        main(["photos", "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"apt-get download {PACKAGES[0]}" in error
    assert "--sources DIR" in error


def test_a_failed_download_is_one_line(tmp_path, monkeypatch, capsys):
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("apt-get", "dpkg-deb"):  # an apt that cannot find the package
        (tools / tool).write_text("#!/bin/sh\necho 'E: Unable to locate package' >&2\nexit 100\n")
        (tools / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:/usr/bin:/bin")
    monkeypatch.setenv("SHORTCUT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit):
        main(["photos", "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert f"cannot fetch {PACKAGES[0]} (E: Unable to locate package)" in error and "--sources DIR" in error
    assert not (tmp_path / "cache" / PACKAGES[0]).exists()  # nothing half-extracted is left as done


def test_shortcut_cache_names_the_cache(sources, tmp_path, monkeypatch, capsys):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "photo_sources").symlink_to(sources)  # the packages, as if fetched there
    monkeypatch.setattr(shutil, "which", lambda name: None)  # a fetch would fail
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SHORTCUT_CACHE", str(tmp_path / "cache"))
    main(
        [
            "photos",
            "--out",
            str(tmp_path / "out"),
            "--image-size",
            "32",
            "--n-train",
            "20",
            "--n-val",
            "8",
            "--n-test",
            "8",
        ]
    )
    printed = capsys.readouterr().out
    assert "test  hoofed_land 2  hoofed_water 2  clawed_land 2  clawed_water 2" in printed
    assert f"wrote {tmp_path / 'out'}" in printed
    assert len(pd.read_csv(tmp_path / "out" / "metadata.csv")) == 36


# -- the variants: correlation100 and patch ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_c100(sources, tmp_path_factory):
    return _build(sources, tmp_path_factory.mktemp("c100") / "photos_c100", variant="correlation100")


@pytest.fixture(scope="module")
def built_patch(sources, tmp_path_factory):
    return _build(sources, tmp_path_factory.mktemp("patch") / "photos_patch", variant="patch")


def test_the_variant_is_recorded(built, built_c100, built_patch):
    records = [json.loads((b / "build.json").read_text()) for b in (built, built_c100, built_patch)]
    assert [r["variant"] for r in records] == ["waterbirds", "correlation100", "patch"]
    assert [r["minority"] for r in records] == [0.05, 0.0, None]
    assert records[2]["patch"]["share"] == 0.5 and records[2]["patch"]["colour"] == list(PATCH["colour"])
    assert records[2]["counts"]["train"] == {
        "hoofed_no_patch": 23,
        "hoofed_patch": 23,
        "clawed_no_patch": 14,
        "clawed_patch": 0,
    }


def test_correlation100_has_no_minority_training_image_and_the_waterbirds_val_and_test(built, built_c100):
    table, waterbirds = pd.read_csv(built_c100 / "metadata.csv"), pd.read_csv(built / "metadata.csv")
    train = table[table.split == 0]
    assert len(train) == 60 and (train.y == train.place).all()  # every class on its own place
    assert (train.y == 0).mean() == pytest.approx(0.77, abs=0.03)
    held_out = table[table.split > 0].reset_index(drop=True)
    pd.testing.assert_frame_equal(held_out, waterbirds[waterbirds.split > 0].reset_index(drop=True))
    for row in held_out.itertuples():  # image for image, the waterbirds build's val and test
        for name in (row.img_filename, row.mask_filename):
            assert (built_c100 / name).read_bytes() == (built / name).read_bytes()


def test_the_patch_is_on_part_of_one_class_and_val_and_test_are_balanced(built_patch):
    table = pd.read_csv(built_patch / "metadata.csv")
    assert list(table.columns) == [*COLUMNS, "background", "patch_box", "patch_on_animal"]
    train, val, test = (table[table.split == s] for s in (0, 1, 2))
    assert (train[train.y == 1].place == 0).all()  # never on a clawed training image
    assert train[train.y == 0].place.mean() == pytest.approx(0.5, abs=0.03)  # on half the hoofed ones
    for split in (val, test):  # place is the patch flag: the four groups of class x patch
        assert split.groupby(["y", "place"]).size().tolist() == [4, 4, 4, 4]
    # the background is no shortcut: half of every class x patch group on land, half on water
    sizes = table.groupby(["split", "y", "place", "background"]).size().unstack(fill_value=0)
    assert ((sizes[0] - sizes[1]).abs() <= 1).all()


def test_the_patch_masks_mark_the_patch_and_images_without_one_have_none(built_patch):
    table = pd.read_csv(built_patch / "metadata.csv")
    patched, bare = table[table.place == 1], table[table.place == 0]
    assert bare.mask_filename.isna().all() and bare.patch_box.isna().all()
    assert len(list((built_patch / "masks").iterdir())) == len(patched)  # no mask file without a patch
    assert patched.patch_on_animal.le(PATCH["max_cover"]).mean() > 0.8  # the animal stays in view
    for row in patched.itertuples():
        x0, y0, x1, y1 = map(int, row.patch_box.split())
        assert (x1 - x0) == (y1 - y0) and 64 / 6 - 1 <= x1 - x0 <= 64 / 5 + 1
        with (
            Image.open(built_patch / row.img_filename) as image,
            Image.open(built_patch / row.mask_filename) as mask_image,
        ):
            mask = np.asarray(mask_image) > 127
            inner = np.asarray(mask_image.filter(ImageFilter.MinFilter(3))) > 127
            colour = np.abs(np.asarray(image, int) - np.array(PATCH["colour"])).max(axis=2) < 60
        ys, xs = np.nonzero(mask)
        assert mask.any() and (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
        assert colour[inner].all() and not colour[~mask].any()  # the mask covers every patch pixel


def test_the_datamodule_reads_the_patch_build_with_its_groups_and_masks(built_patch):
    dm = MetadataDataModule(
        root=str(built_patch),
        image_size=64,
        batch_size=16,
        num_workers=0,
        class_names=["hoofed", "clawed"],
        spurious_names=["no_patch", "patch"],
    )
    assert dm.group_names == ["hoofed_no_patch", "hoofed_patch", "clawed_no_patch", "clawed_patch"]
    dm.setup("fit")
    assert dm.group_counts("train").tolist() == [23, 23, 14, 0]
    assert dm.group_counts("val").tolist() == [4, 4, 4, 4]
    batch = next(iter(dm.dataloader("val")))
    marked = batch["mask"].flatten(1).any(dim=1)
    assert (marked == (batch["spurious"] == 1)).all()  # the spurious region: the patch, where there is one
    assert batch["mask"][marked].float().mean() == pytest.approx(np.pi / 4 * (11.7 / 64) ** 2, rel=0.4)


def test_variant_settings_are_checked(sources, tmp_path):
    with pytest.raises(DataError, match="unknown: choose one of waterbirds, correlation100, patch"):
        _build(sources, tmp_path / "x", variant="ninety")
    with pytest.raises(DataError, match="correlation100 has no minority images"):
        _build(sources, tmp_path / "x", variant="correlation100", minority=0.05)
    with pytest.raises(DataError, match="drop minority"):
        _build(sources, tmp_path / "x", variant="patch", minority=0.05)


def test_the_command_builds_a_variant_into_its_own_folder(sources, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    small = ["--image-size", "32", "--n-train", "20", "--n-val", "8", "--n-test", "8"]
    main(["photos", "--variant", "patch", "--sources", str(sources), *small])
    printed = capsys.readouterr().out
    assert "test  hoofed_no_patch 2  hoofed_patch 2  clawed_no_patch 2  clawed_patch 2" in printed
    assert "wrote data/photos_patch" in printed and "mask_marks: spurious" in printed
    main(["photos", "--variant", "correlation100", "--sources", str(sources), *small])
    assert "train hoofed_land 15  hoofed_water 0  clawed_land 0  clawed_water 5" in capsys.readouterr().out
    assert (tmp_path / "data" / "photos_c100" / "metadata.csv").is_file()
