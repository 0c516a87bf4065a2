"""Rank-0 decisions under DDP (2 CPU processes, gloo, ddp_spawn): the s-score pruning and DFR give what one
process gives, while the features of their embedding passes reach rank 0 alone.

DFR's head and PruSC's clusters against one process are in tests/test_ddp.py; this adds the s-score pruning,
whose before/after reports rank 0 now computes and broadcasts, and a record of what each rank held.
"""

from __future__ import annotations

import json
import os

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from shortcut_lightning import DeepFeatureReweighting, ShortcutClassifier, SpuriousScore, SyntheticShortcuts
from shortcut_lightning.probing import embedding_pass

from helpers import make_trainer


class HeldRows(Callback):
    """Records, on every rank, the samples and feature rows each embedding pass returned (``held_rank<r>.json``).

    Wraps ``embedding_pass.collect_embeddings`` for the run (``embed_splits`` calls it through the module), in
    the process that runs the stages: under ``ddp_spawn`` each spawned rank.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        original, records = embedding_pass.collect_embeddings, []

        def recording(*args, **kwargs):
            found = original(*args, **kwargs)
            records.append({"desc": kwargs["desc"], "samples": len(found), "features": len(found.features)})
            return found

        self._wrapped = (original, records)
        embedding_pass.collect_embeddings = recording

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        original, records = self._wrapped
        embedding_pass.collect_embeddings = original
        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, f"held_rank{trainer.global_rank}.json"), "w") as handle:
            json.dump(records, handle)


def _prune_and_refit(root, devices: int) -> dict:
    torch.manual_seed(0)
    model = ShortcutClassifier("test_resnet")
    # odd split sizes: uneven shards, padded by the sampler, must not count a sample twice
    dm = SyntheticShortcuts(n_train=40, n_val=37, n_test=13, image_size=64, batch_size=8)
    stages = [
        SpuriousScore(n_samples=6, prune_above=0.5, report_splits=("val", "test")),
        DeepFeatureReweighting(num_refits=2, c_grid=(1.0, 0.1), scaler_split=None, report_splits=("test",)),
    ]
    trainer = make_trainer(root, [HeldRows(str(root)), *stages], devices=devices)
    trainer.validate(model, datamodule=dm)
    held = {r: json.loads((root / f"held_rank{r}.json").read_text()) for r in range(devices)}
    return {
        "sscore": json.loads((root / "sscore.json").read_text())["pruning"],
        "dfr": json.loads((root / "dfr.json").read_text()),
        "head": torch.load(root / "dfr_head.pt"),
        "held": held,
    }


def test_sscore_pruning_and_dfr_under_ddp_decide_on_rank_zero_alone(tmp_path):
    one = _prune_and_refit(tmp_path / "one", devices=1)
    two = _prune_and_refit(tmp_path / "two", devices=2)
    assert two["sscore"]["neurons"] == one["sscore"]["neurons"] and one["sscore"]["neurons"]
    for key in ("before", "after"):
        assert two["sscore"][key] == one["sscore"][key]
        assert two["dfr"][key] == one["dfr"][key]
    assert two["dfr"]["c"] == one["dfr"]["c"]
    torch.testing.assert_close(two["head"], one["head"], rtol=0, atol=2e-3)  # float noise of other batches

    sizes = {"val": 37, "test": 13}
    passes = {f"s-score pruning: embedding {s}" for s in sizes} | {
        "DFR: embedding val",
        "DFR: embedding test",
    }
    for rank, records in two["held"].items():
        assert {r["desc"] for r in records} == passes
        for record in records:
            assert (
                record["samples"] == sizes[record["desc"].rsplit(" ", 1)[1]]
            )  # labels and logits: every rank
            assert record["features"] == (record["samples"] if rank == 0 else 0), (rank, record)
