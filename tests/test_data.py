"""Datamodules: the sample contract, both metadata schemas, presets, samplers and every bad input."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from shortcut_lightning.data import CelebA, MetadataDataModule, SyntheticShortcuts, Waterbirds
from shortcut_lightning.data.samplers import BalancedSampler, EvalShardSampler
from shortcut_lightning.errors import DataError

from conftest import write_image


# -- the embedded default -------------------------------------------------------------------------
@pytest.mark.parametrize("kind,n_spurious", [("background", 2), ("patch", 2), ("both", 4)])
def test_synthetic_contract(tiny_synthetic, kind, n_spurious):
    dm = tiny_synthetic(spurious=kind)
    dm.setup("fit")
    assert dm.n_spurious == n_spurious and dm.num_groups == 2 * n_spurious
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (16, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (16, 1, 32, 32) and batch["mask"].dtype == torch.bool
    assert torch.equal(batch["group"], batch["target"] * n_spurious + batch["spurious"])
    assert torch.equal(batch["index"], torch.arange(16))
    assert dm.group_counts("val").sum() == 37


def test_synthetic_is_deterministic_and_seeded(tiny_synthetic):
    a, b, c = tiny_synthetic(), tiny_synthetic(), tiny_synthetic(data_seed=1)
    xa, xb, xc = (dm.dataset("train")[5]["image"] for dm in (a, b, c))
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)


def test_synthetic_background_mask_is_outside_the_object(tiny_synthetic):
    dm = tiny_synthetic(spurious="background")
    mask = dm.dataset("train")[0]["mask"]
    assert 0.5 < mask.float().mean() < 0.99  # most of the image is background, the object is not


def test_synthetic_patch_shortcut_rates():
    dm = SyntheticShortcuts(spurious="patch", n_train=2000, n_val=10, n_test=10, image_size=16)
    counts = dm.group_counts("train")  # backslash_no_patch, backslash_patch, slash_no_patch, slash_patch
    assert counts[3] == 0  # ISIC-like: no class-1 image carries a patch in training
    assert 0.4 < counts[1] / (counts[0] + counts[1]) < 0.6
    test = dm.group_counts("test")
    assert (test > 0).all()


def test_synthetic_background_minority_share():
    dm = SyntheticShortcuts(n_train=4000, n_val=10, n_test=10, image_size=16, minority_share=0.05)
    c = dm.group_counts("train").double()
    assert 0.03 < c[1] / (c[0] + c[1]) < 0.07 and 0.03 < c[2] / (c[2] + c[3]) < 0.07


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"spurious": "texture"}, "spurious"),
        ({"minority_share": 1.5}, "minority_share"),
        ({"class_share": 0.0}, "class_share"),
        ({"sampler": "uniform"}, "sampler"),
        ({"batch_size": 0}, "batch_size"),
        ({"train_split": "test"}, "train_split"),
    ],
)
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(DataError, match=field):
        SyntheticShortcuts(**kwargs)


def test_train_split_val_trains_on_every_validation_sample_and_says_so(tmp_path, tiny_synthetic):
    """The retraining control of docs/results.md from the CLI: a fit on the held-out split, class labels only."""
    import lightning as L

    from shortcut_lightning import ShortcutClassifier

    from helpers import BatchIndices

    drawn = BatchIndices()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        callbacks=[drawn],
    )
    dm = tiny_synthetic(train_split="val")
    with pytest.warns(UserWarning, match="data.train_split is 'val'"):
        trainer.fit(ShortcutClassifier("test_resnet"), datamodule=dm)
    assert sorted(drawn.drawn[0]) == list(range(37))  # n_val of TINY; n_train is 96


# -- samplers -------------------------------------------------------------------------------------
def test_balanced_samplers_balance_and_are_epoch_deterministic():
    targets = torch.tensor([0] * 90 + [1] * 10)
    groups = targets * 2 + torch.tensor([0] * 85 + [1] * 5 + [0] * 2 + [1] * 8)
    s = BalancedSampler(targets, groups, "group_balanced", seed=3)
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(0)
    assert list(s) == first
    s.set_epoch(1)
    assert list(s) != first
    draws = []
    for epoch in range(40):
        s.set_epoch(epoch)
        draws += list(s)
    share = torch.bincount(groups[torch.tensor(draws)], minlength=4).double() / len(draws)
    assert torch.allclose(share, torch.full((4,), 0.25, dtype=torch.float64), atol=0.03)
    c = BalancedSampler(targets, groups, "class_balanced")
    drawn = torch.tensor([i for e in range(20) for i in (c.set_epoch(e) or list(c))])
    assert abs(targets[drawn].double().mean() - 0.5) < 0.04
    d = BalancedSampler(targets, groups, "default")
    assert sorted(d) == list(range(100))


def test_a_resumed_fit_with_loader_workers_draws_the_batches_of_an_uninterrupted_one(
    tmp_path, tiny_synthetic
):
    """With worker processes the loader draws an epoch's order before Lightning sets the sampler's epoch."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from shortcut_lightning import ShortcutClassifier

    from helpers import BatchIndices

    def fit(max_epochs, callbacks, ckpt_path=None):
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=max_epochs,
            default_root_dir=tmp_path,
            logger=False,
            enable_progress_bar=False,
            limit_val_batches=0,
            callbacks=callbacks,
        )
        dm = tiny_synthetic(num_workers=2, sampler="class_balanced")
        trainer.fit(ShortcutClassifier("test_resnet"), datamodule=dm, ckpt_path=ckpt_path)

    whole = BatchIndices()
    fit(2, [whole])
    fit(1, [ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)])
    resumed = BatchIndices()
    fit(2, [resumed], ckpt_path=tmp_path / "ck" / "last.ckpt")
    assert whole.drawn[0] != whole.drawn[1]
    assert list(resumed.drawn) == [1] and resumed.drawn[1] == whole.drawn[1]


def test_upsampled_epochs_hold_each_sample_its_repeat_count_and_shard_across_ranks(monkeypatch):
    from collections import Counter

    import shortcut_lightning.data.samplers as samplers

    targets = torch.tensor([0] * 6 + [1] * 4)
    repeats = torch.tensor([1, 3, 1, 0, 1, 1, 5, 1, 1, 1])  # 15 draws an epoch
    subset = torch.tensor([1, 3, 6, 8, 9])  # repeats index the whole split; the subset keeps 3+0+5+1+1
    whole, shards = BalancedSampler(targets, targets, repeats=repeats), []
    assert len(whole) == 15 and sorted(whole) == sorted(
        torch.repeat_interleave(torch.arange(10), repeats).tolist()
    )
    whole.set_epoch(1)
    assert list(whole) != (whole.set_epoch(0) or list(whole))  # a new shuffle each epoch
    assert sorted(BalancedSampler(targets, targets, subset=subset, repeats=repeats)) == [1] * 3 + [6] * 5 + [
        8,
        9,
    ]
    for rank in range(2):
        monkeypatch.setattr(samplers, "world", lambda rank=rank: (2, rank))
        shard = BalancedSampler(targets, targets, repeats=repeats)
        assert len(shard) == 8 and len(list(shard)) == 8
        shards += list(shard)
    extra, missing = Counter(shards) - Counter(whole), Counter(whole) - Counter(shards)
    assert sum(extra.values()) == 1 and not missing  # both ranks together: the epoch and one pad


def test_eval_shards_cover_each_sample_once(monkeypatch):
    import shortcut_lightning.data.samplers as samplers

    seen = []
    for rank in range(3):
        monkeypatch.setattr(samplers, "world", lambda rank=rank: (3, rank))
        shard = list(EvalShardSampler(10))
        assert len(shard) == len(EvalShardSampler(10))
        seen += shard
    assert sorted(seen) == list(range(10))


# -- metadata folders -----------------------------------------------------------------------------
@pytest.mark.parametrize("schema", ["waterbirds", "subpopbench"])
def test_metadata_schemas(metadata_folder, schema):
    root = metadata_folder(schema)
    dm = MetadataDataModule(root=str(root), image_size=16, batch_size=4, num_workers=0)
    dm.setup("fit")
    assert dm.splits == ("train", "val", "test")
    assert dm.num_classes == 2 and dm.num_groups == 4
    assert dm.group_counts("train").tolist() == [3, 3, 3, 3]
    batch = next(iter(dm.dataloader("val")))
    assert batch["image"].shape == (4, 3, 16, 16)
    assert batch["mask"].shape == (4, 1, 16, 16)
    assert torch.equal(batch["group"], batch["target"] * 2 + batch["spurious"])
    train = next(iter(dm.train_dataloader()))
    assert train["image"].shape == (4, 3, 16, 16) and train["mask"].shape == (4, 1, 16, 16)


def test_masks_follow_their_image_and_core_masks_invert(metadata_folder):
    root = metadata_folder()
    spur = MetadataDataModule(root=str(root), image_size=20, num_workers=0, augment=False)
    core = Waterbirds(root=str(root), image_size=20, num_workers=0, augment=False)
    m_spur, m_core = spur.dataset("train")[0]["mask"], core.dataset("train")[0]["mask"]
    assert torch.equal(m_spur, ~m_core)
    assert m_spur[0, 0].all() and not m_spur[0, -1].any()  # top half marked in the file, after resize+crop
    assert core.group_names == ["landbird_land", "landbird_water", "waterbird_land", "waterbird_water"]


def test_empty_mask_cell_means_no_spurious_region(metadata_folder):
    root = metadata_folder()
    table = pd.read_csv(root / "metadata.csv")
    table.loc[0, "mask_filename"] = None
    table.to_csv(root / "metadata.csv", index=False)
    dm = MetadataDataModule(root=str(root), image_size=16, num_workers=0)
    assert not dm.dataset("train")[0]["mask"].any()


def test_celeba_layout(tmp_path):
    root = tmp_path / "celeba"
    ids = [f"{i:06d}.jpg" for i in range(12)]
    for i, name in enumerate(ids):
        write_image(root / "img_align_celeba" / "img_align_celeba" / name, seed=i)
    blond = [1 if i % 3 == 0 else -1 for i in range(12)]
    male = [1 if i % 2 else -1 for i in range(12)]
    pd.DataFrame({"image_id": ids, "Blond_Hair": blond, "Male": male, "Smiling": male}).to_csv(
        root / "list_attr_celeba.csv", index=False
    )
    pd.DataFrame({"image_id": ids, "partition": [i % 3 for i in range(12)]}).to_csv(
        root / "list_eval_partition.csv", index=False
    )
    dm = CelebA(root=str(root), image_size=16, num_workers=0)
    assert dm.group_names == [
        "not_Blond_Hair_not_Male",
        "not_Blond_Hair_Male",
        "Blond_Hair_not_Male",
        "Blond_Hair_Male",
    ]
    sample = dm.dataset("train")[0]
    assert sample["target"] == 1 and sample["spurious"] == 0 and "mask" not in sample
    with pytest.raises(DataError, match="Wavy_Hair"):
        CelebA(root=str(root), target_attribute="Wavy_Hair")


# -- bad input ------------------------------------------------------------------------------------
def test_missing_data_folder_names_folder_and_doc(tmp_path):
    with pytest.raises(DataError, match=r"nowhere.*does not exist.*docs/datasets.md"):
        Waterbirds(root=str(tmp_path / "nowhere"))


def test_missing_column_is_named_with_the_fix(metadata_folder):
    root = metadata_folder()
    pd.read_csv(root / "metadata.csv").drop(columns=["place"]).to_csv(root / "metadata.csv", index=False)
    with pytest.raises(DataError, match=r"lacks column\(s\) 'place'.*spurious_column"):
        MetadataDataModule(root=str(root))


def test_column_overrides(metadata_folder):
    root = metadata_folder()
    pd.read_csv(root / "metadata.csv").rename(columns={"place": "background"}).to_csv(
        root / "metadata.csv", index=False
    )
    dm = MetadataDataModule(root=str(root), spurious_column="background", num_workers=0)
    assert dm.num_groups == 4


def test_unknown_split_code(metadata_folder):
    root = metadata_folder()
    table = pd.read_csv(root / "metadata.csv")
    table.loc[3, "split"] = 7
    table.to_csv(root / "metadata.csv", index=False)
    with pytest.raises(DataError, match=r"unknown split code\(s\) 7.*0/1/2"):
        MetadataDataModule(root=str(root))


def test_non_integer_labels(metadata_folder):
    root = metadata_folder()
    table = pd.read_csv(root / "metadata.csv")
    table["y"] = table["y"].astype(object)
    table.loc[2, "y"] = "bird"
    table.to_csv(root / "metadata.csv", index=False)
    with pytest.raises(DataError, match=r"column 'y'.*'bird'"):
        MetadataDataModule(root=str(root))


def test_a_corrupt_image_is_skipped_and_counted(metadata_folder):
    root = metadata_folder(per_group=30)
    table = pd.read_csv(root / "metadata.csv")
    (root / table.loc[0, "img_filename"]).write_bytes(b"not an image")
    dm = MetadataDataModule(root=str(root), image_size=16, num_workers=0, max_bad_images=0.05)
    with pytest.warns(UserWarning, match=r"skipped 1 of 360 images.*" + table.loc[0, "img_filename"]):
        dm.setup("fit")
    assert len(dm.dataset("train")) == 119


def test_many_missing_images_fail_with_the_root_hint(metadata_folder):
    root = metadata_folder()
    table = pd.read_csv(root / "metadata.csv")
    for name in table["img_filename"][:5]:
        (root / name).unlink()
    dm = MetadataDataModule(root=str(root), num_workers=0)
    with pytest.raises(DataError, match=r"5 of 36 images .* missing or unreadable.*data.root"):
        dm.setup("fit")


def test_unreadable_image_at_load_time_names_the_file(metadata_folder):
    root = metadata_folder()
    table = pd.read_csv(root / "metadata.csv")
    (root / table.loc[0, "img_filename"]).write_bytes(b"garbage")
    dm = MetadataDataModule(root=str(root), check_images="none", num_workers=0)
    with pytest.raises(DataError, match=table.loc[0, "img_filename"]):
        dm.dataset("train")[0]


def test_empty_group_in_val_or_test_warns(metadata_folder):
    root = metadata_folder()
    table = pd.read_csv(root / "metadata.csv")
    table = table[~((table["split"] == 2) & (table["y"] == 1) & (table["place"] == 1))]
    table.to_csv(root / "metadata.csv", index=False)
    dm = MetadataDataModule(root=str(root), num_workers=0)
    with pytest.warns(UserWarning, match=r"y1_a1 have no samples in the test split"):
        dm.setup("test")


def test_missing_split_for_stage(metadata_folder):
    root = metadata_folder()
    table = pd.read_csv(root / "metadata.csv")
    table[table["split"] != 2].to_csv(root / "metadata.csv", index=False)
    dm = MetadataDataModule(root=str(root), num_workers=0)
    with pytest.raises(DataError, match="needs a 'test' split"):
        dm.setup("test")
