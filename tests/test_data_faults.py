"""Data as users have it: mask and image files in every common form, labels that are not 0..K-1, one-class splits."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from shortcut_lightning.data import FileImageDataset, MetadataDataModule, Waterbirds
from shortcut_lightning.errors import DataError

from conftest import write_image


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SHORTCUT_LIGHTNING_CACHE", str(tmp_path / "resized"))  # never the user's home cache


REGION = np.zeros((20, 24), dtype=bool)
REGION[:8, 5:15] = True  # the spurious region every mask form below marks


def raw(images, masks=None):
    """The files as read, before any transform: uint8 [3,H,W] images and bool [1,H,W] masks."""
    n = len(images)
    return FileImageDataset(
        images, masks, targets=torch.zeros(n), spurious=torch.zeros(n), n_spurious=1, transform=v2.Identity()
    )


def palette(index: np.ndarray, colours: list[int]) -> Image.Image:
    im = Image.frombytes("P", index.shape[::-1], index.astype(np.uint8).tobytes())
    im.putpalette(colours + [0] * (768 - len(colours)))
    return im


def rgba(colour: np.ndarray, alpha: np.ndarray) -> Image.Image:
    return Image.fromarray(np.dstack([colour, alpha]).astype(np.uint8))


def mask_form(form: str) -> Image.Image:
    r = REGION.astype(np.uint8)
    rgb = np.zeros((20, 24, 3), np.uint8)
    rgb[REGION] = (200, 0, 0)  # red: luminance 60, read as empty by a > 127 rule on gray
    return {
        "gray_0_255": lambda: Image.fromarray(r * 255),
        "gray_0_1": lambda: Image.fromarray(r),
        "16bit_0_1": lambda: Image.fromarray(r.astype(np.uint16)),
        "16bit_0_65535": lambda: Image.fromarray(r.astype(np.uint16) * 65535),
        "1bit": lambda: Image.fromarray(REGION),
        "rgb": lambda: Image.fromarray(rgb),
        "rgba_colour": lambda: rgba(rgb, np.full((20, 24, 1), 255)),
        "rgba_alpha_only": lambda: rgba(np.zeros_like(rgb), r[..., None] * 255),
        "palette_voc": lambda: palette(r, [0, 0, 0, 128, 0, 0]),  # index 1 = (128, 0, 0): luminance 38
    }[form]()


@pytest.mark.parametrize(
    "form",
    [
        "gray_0_255",
        "gray_0_1",
        "16bit_0_1",
        "16bit_0_65535",
        "1bit",
        "rgb",
        "rgba_colour",
        "rgba_alpha_only",
        "palette_voc",
    ],
)
def test_every_mask_form_marks_its_region(tmp_path, form):
    write_image(tmp_path / "a.png")
    mask_form(form).save(tmp_path / "m.png")
    mask = raw([tmp_path / "a.png"], [tmp_path / "m.png"])[0]["mask"]
    assert torch.equal(mask[0], torch.from_numpy(REGION)), f"{form}: {int(mask.sum())} of {REGION.sum()} set"


def test_masks_follow_their_image_s_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: the camera was held rotated by 90 degrees
    image = np.zeros((20, 30, 3), np.uint8)
    image[:, :4] = 255  # a white stripe on the stored left edge
    Image.fromarray(image).save(tmp_path / "a.png", exif=exif)
    stored = np.zeros((20, 30), np.uint8)
    stored[:, :4] = 255
    Image.fromarray(stored).save(tmp_path / "m.png", exif=exif)
    sample = raw([tmp_path / "a.png"], [tmp_path / "m.png"])[0]
    assert sample["image"].shape == (3, 30, 20)  # as the camera held it
    assert sample["image"][:, :4].float().mean() == 255 and sample["image"][:, 4:].float().mean() == 0
    assert sample["mask"][0, :4].all() and not sample["mask"][0, 4:].any()  # the mask turned with it


def test_mask_threshold_reads_noisy_jpeg_style_masks_and_is_validated(metadata_folder):
    root = metadata_folder(per_group=1)
    noisy = np.where(REGION, 200, 40).astype(np.uint8)  # compression noise around 0 and 255
    for path in pd.read_csv(root / "metadata.csv")["mask_filename"]:
        Image.fromarray(noisy).save(root / path)
    for threshold, expected in ((0.5, REGION), (0.0, np.ones_like(REGION))):
        dm = MetadataDataModule(root=str(root), num_workers=0, mask_threshold=threshold)
        _, mask = dm.dataset("train").load(0)  # before any transform
        assert torch.equal(mask[0], torch.from_numpy(expected)), threshold
    with pytest.raises(DataError, match=r"data.mask_threshold must lie in \[0, 1\), got 1.5"):
        MetadataDataModule(root=str(root), mask_threshold=1.5)


@pytest.mark.parametrize("case", ["empty", "core_covers_all"])
def test_a_mask_column_that_marks_nothing_is_refused_at_setup(metadata_folder, case):
    root = metadata_folder()
    value = 0 if case == "empty" else 255
    for path in pd.read_csv(root / "metadata.csv")["mask_filename"]:
        Image.fromarray(np.full((20, 24), value, np.uint8)).save(root / path)
    kind = MetadataDataModule if case == "empty" else Waterbirds  # Waterbirds: mask_marks core
    dm = kind(root=str(root), image_size=16, num_workers=0)
    expected = (
        r"are empty: .*mask_threshold" if case == "empty" else r"cover the whole image.*mask_marks: spurious"
    )
    with pytest.raises(DataError, match=rf"all 32 masks sampled from {root / 'masks'} .*{expected}"):
        dm.setup("fit")


# -- images ---------------------------------------------------------------------------------------
def test_images_follow_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    image = np.zeros((20, 30, 3), np.uint8)
    image[:, :4] = (255, 0, 0)  # stored left edge red: the top edge as the camera held it
    Image.fromarray(image).save(tmp_path / "a.png", exif=exif)
    read = raw([tmp_path / "a.png"])[0]["image"]
    assert read.shape == (3, 30, 20)
    assert (read[0, :4] == 255).all() and (read[0, 4:] == 0).all()


def test_sixteen_bit_and_float_images_are_scaled_by_value(tmp_path):
    values = np.linspace(0, 65535, 20 * 24).reshape(20, 24).astype(np.uint16)
    expected = torch.from_numpy(np.rint(values / 257).astype(np.uint8))
    Image.fromarray(values).save(tmp_path / "i16.png")  # Pillow reads it as I;16
    Image.fromarray(values.astype(np.int32)).save(tmp_path / "i32.tif")  # mode I
    floats = np.linspace(0, 1, 20 * 24, dtype=np.float32).reshape(20, 24)
    Image.fromarray(floats).save(tmp_path / "f.tif")
    ds = raw([tmp_path / "i16.png", tmp_path / "i32.tif", tmp_path / "f.tif"])
    for k in range(2):
        image = ds[k]["image"]
        assert image.shape == (3, 20, 24) and torch.equal(image[1], expected), ds.paths[k].name
    assert torch.equal(ds[2]["image"][0], torch.from_numpy(np.rint(floats * 255).astype(np.uint8)))
    Image.fromarray(floats * 3).save(tmp_path / "hdr.tif")
    with pytest.raises(
        DataError, match=r"hdr.tif holds floating-point pixels from 0 to 3: only values in \[0, 1\]"
    ):
        raw([tmp_path / "hdr.tif"])[0]


@pytest.mark.parametrize("mode", ["L", "LA", "1", "P", "CMYK", "RGBA"])
def test_every_colour_mode_becomes_rgb(tmp_path, mode):
    """Regression guard: Pillow's own conversions (these already worked before the 16-bit/EXIF fixes)."""
    source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8))
    im = source.convert(mode)
    im.save(tmp_path / ("a.tif" if mode == "CMYK" else "a.png"))
    read = raw([tmp_path / ("a.tif" if mode == "CMYK" else "a.png")])[0]["image"]
    assert read.shape == (3, 20, 24) and torch.equal(
        read.permute(1, 2, 0), torch.from_numpy(np.array(im.convert("RGB")))
    )


def test_an_image_over_pillow_s_limit_is_named_with_its_size_and_the_fix(metadata_folder, monkeypatch):
    root = metadata_folder(masks=False, per_group=1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 20x24 images (480 pixels) exceed twice that
    first = root / pd.read_csv(root / "metadata.csv")["img_filename"][0]
    with pytest.raises(
        DataError, match=rf"{first} has 480 pixels, more than Pillow allows.*max_image_pixels"
    ):
        raw([first])[0]
    dm = MetadataDataModule(root=str(root), image_size=16, num_workers=0, max_image_pixels=1000)
    dm.setup("fit")
    assert dm.dataset("train")[0]["image"].shape == (3, 16, 16)
    refused = MetadataDataModule(root=str(root), num_workers=0, max_bad_images=0.0)
    with pytest.raises(
        DataError, match=r"12 of 12 images .* \(too large: 480 pixels, see data.max_image_pixels\)"
    ):
        refused.setup("fit")


def test_max_image_pixels_travels_with_the_dataset_to_a_fresh_process(metadata_folder, monkeypatch):
    """A spawned loader worker unpickles the dataset in a process whose Pillow limit is the default: simulated
    here by a pickle round trip after the parent's global is reset (a spawn worker costs seconds to start)."""
    root = metadata_folder(masks=False, per_group=1)
    dm = MetadataDataModule(root=str(root), image_size=16, check_images="none", max_image_pixels=100)
    dataset = pickle.dumps(dm.dataset("train"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # what a fresh process has
    with pytest.raises(DataError, match=r"has 480 pixels, more than data\.max_image_pixels \(100\)"):
        pickle.loads(dataset)[0]


# -- labels ---------------------------------------------------------------------------------------
def test_labels_that_are_not_0_to_k_are_remapped_over_the_whole_table(metadata_folder, caplog):
    root = metadata_folder(masks=False, per_group=1)
    table = pd.read_csv(root / "metadata.csv")
    table["y"] += 1  # 1/2
    table["place"] = table["place"] * 2 - 1  # -1/1
    table.loc[(table["split"] == 2) & (table["y"] == 1), "split"] = 0  # the test split holds only y=2
    table.to_csv(root / "metadata.csv", index=False)
    with caplog.at_level(logging.INFO):
        dm = MetadataDataModule(root=str(root), num_workers=0)
    assert dm.num_classes == 2 and dm.class_names == ["y1", "y2"] and dm.spurious_names == ["a-1", "a1"]
    assert (
        rf"column 'y' of {root / 'metadata.csv'} holds 1, 2: read as classes 0, 1 (1->0, 2->1)" in caplog.text
    )
    assert dm.dataset("test").targets.tolist() == [1, 1]  # y=2 is class 1 in every split
    assert Waterbirds(root=str(root)).class_names == ["landbird", "waterbird"]
    with pytest.raises(DataError, match=r"class_names names 3 values but column 'target' holds 2 \(1, 2"):
        MetadataDataModule(root=str(root), class_names=["a", "b", "c"])


def test_labels_that_are_not_integers_are_refused_with_the_values_found(metadata_folder):
    root = metadata_folder(masks=False, per_group=1)
    table = pd.read_csv(root / "metadata.csv").astype({"y": object})
    table.loc[[1, 4, 5], "y"] = ["bird", "2.5", None]
    table.to_csv(root / "metadata.csv", index=False)
    with pytest.raises(DataError) as error:
        MetadataDataModule(root=str(root))
    message = str(error.value)
    assert "\n" not in message and f"column 'y' of {root / 'metadata.csv'}" in message
    assert all(v in message for v in ("'bird'", "2.5", "empty cell")), message


# -- splits with one class ------------------------------------------------------------------------
def test_a_training_split_with_one_class_is_refused_and_an_evaluation_split_warned(metadata_folder):
    root = metadata_folder(masks=False, per_group=1)
    table = pd.read_csv(root / "metadata.csv")
    table[~((table["split"] == 0) & (table["y"] == 1))].to_csv(root / "metadata.csv", index=False)
    with pytest.raises(
        DataError, match=r"the train split holds only class 'y0': training needs at least two"
    ):
        MetadataDataModule(root=str(root), num_workers=0).setup("fit")
    table[~((table["split"] == 1) & (table["y"] == 0))].to_csv(root / "metadata.csv", index=False)
    with pytest.warns(UserWarning, match=r"the val split holds only class 'y1'"):
        MetadataDataModule(root=str(root), num_workers=0).setup("fit")
