"""The rows of the photo benchmark: each stage's composed config and what the row changes, from one ERM checkpoint.

Every stage starts from the ERM checkpoint the ERM row was tested on (best by ``val/mean``), at epoch 0, and
trains STAGE_EPOCHS epochs; JTT and GroupDRO train from ImageNet for ERM's 3 epochs, as their papers do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.stage_configs import config_files as dataset_files

STAGE_EPOCHS = 2  # each training stage and each control, after ERM
# PruSC + fine-tuning's epochs after its mask epoch (configs/photos/prusc_finetune.yaml), and its control's
FINETUNE_EPOCHS = 4
QUICK_ROWS = ("DFR", "SCORE (auto)")
SCRATCH_ROWS = ("DFR",)
# NeuronRegularization's penalty variants (issue 43)
ACTIVATION = {"penalty": "activation", "regularize_on": "all"}  # the original penalty, whatever a config says
CONTRIBUTION = {"penalty": "contribution", "regularize_on": "class"}
MASKED_LOGIT = {"penalty": "masked_logit", "regularize_on": "pairs"}
SCORE_VARIANTS = ("SCORE (auto)", "SCORE (contribution)", "SCORE (masked logit)")
# label -> (config files, callback overrides by class name, top-level overrides, extra CLI args)
Row = tuple[list[str], dict[str, dict[str, Any]], dict[str, Any], list[str]]


def stage_rows(ckpt: str, dataset: str = "photos") -> dict[str, Row]:
    """Every row after ERM, starting from the checkpoint ``ckpt``, with the configs of ``configs/<dataset>/``
    (``photos``, or its regimes ``photos_c100`` and ``photos_patch``)."""

    def config_files(*stages: str) -> list[str]:
        return dataset_files(dataset, *stages)

    epochs = {"trainer__max_epochs": STAGE_EPOCHS, "model__weights": ckpt}
    no_training = {"trainer__max_epochs": 0, "model__weights": ckpt}
    mask_then_finetune = {**epochs, "trainer__max_epochs": 1 + FINETUNE_EPOCHS}  # 1 mask epoch first
    finetune_only = {**epochs, "trainer__max_epochs": FINETUNE_EPOCHS}
    score = {"SpuriousPositiveMining": {"start_epoch": 0}, "NeuronRegularization": {"start_epoch": 0}}
    oracle = {**score, "SpuriousPositiveMining": {"start_epoch": 0, "selection": "oracle"}}
    prusc, finetune = config_files("prusc"), config_files("prusc_finetune")
    return {
        "DFR": (config_files("dfr"), {}, no_training, []),
        "PruSC": (prusc, {"MaskPruning": {"start_epoch": 0}}, epochs, []),
        # the best mask epoch even where the dense model validates better: what the masks do
        "PruSC (mask epochs only)": (
            prusc,
            {"MaskPruning": {"start_epoch": 0, "keep_dense": False}},
            epochs,
            [],
        ),
        # PruSC's fine-tuning step on clusters that isolate the minority groups (k-means in each class at
        # net.blocks.4): 1 mask epoch, then FINETUNE_EPOCHS cluster-balanced epochs on train
        "PruSC + fine-tuning": (finetune, {"MaskPruning": {"start_epoch": 0}}, mask_then_finetune, []),
        "SCORE (auto)": (config_files("score"), _regularize(score, ACTIVATION), epochs, []),
        "SCORE (oracle)": (config_files("score"), _regularize(oracle, ACTIVATION), epochs, []),
        # the penalty variants (issue 43; docs/methods.md, SCORE): the selected neurons' contribution to the
        # logit of the class they were mined for, on that class's samples; the class evidence of the spurious
        # region alone, on the pairs' masked images
        "SCORE (contribution)": (config_files("score"), _regularize(score, CONTRIBUTION), epochs, []),
        "SCORE (masked logit)": (config_files("score"), _regularize(score, MASKED_LOGIT), epochs, []),
        # the contribution penalty on the neurons the true spurious masks give (annotations)
        "SCORE (oracle, contribution)": (
            config_files("score"),
            _regularize(oracle, CONTRIBUTION),
            epochs,
            [],
        ),
        # does the mining matter: the contribution penalty on as many random channels per class
        "control: SCORE on random neurons": (
            config_files("score"),
            _regularize(score, {**CONTRIBUTION, "random_neurons": True}),
            epochs,
            [],
        ),
        # the same for the original penalty (the variant validation keeps on the photo benchmark)
        "control: SCORE on random neurons (activation)": (
            config_files("score"),
            _regularize(score, {**ACTIVATION, "random_neurons": True}),
            epochs,
            [],
        ),
        "s-score pruning": (config_files("sscore"), {}, no_training, []),
        "AFR": (config_files("afr"), {}, no_training, []),
        # JTT identifies with an early-stopped model (its paper): from ImageNet, 1 ERM epoch, then 2 upsampled
        # ones (error set 50x: about 1.9x an epoch each), the ERM row's 3 epochs; from the ERM checkpoint
        # almost no training sample is misclassified
        "JTT": (config_files("jtt"), {}, {}, []),
        # GroupDRO trains from ImageNet too (its paper; the ERM row's 3 epochs): from the ERM checkpoint it
        # validates lower (docs/experiments/2026-12-05-groupdro-steps-bn-stacking.md)
        "GroupDRO": (config_files("groupdro"), {}, {}, []),
        "control: ERM continued": (config_files(), {}, epochs, []),
        # SCORE's continued ERM: its mining, frozen layers and fresh optimizer, the penalty at strength 0
        "control: SCORE at strength 0": (
            config_files("score"),
            _regularize(score, {**ACTIVATION, "strength": 0.0}),
            epochs,
            [],
        ),
        # no training: ERM's BatchNorm statistics re-estimated on the train images without augmentation
        "control: BatchNorm re-estimated": (config_files("bn_recalibration"), {}, no_training, []),
        # PruSC + fine-tuning's clusters and cluster-balanced epochs without its mask epoch (prune_epochs 0):
        # what the clusters and the selection do alone (the runs recorded with mask_lr 0 and init_logit 50 are
        # still found: without a mask epoch those are inert, PruSCConfig.inert, and out of the run cache's key)
        "control: fine-tuning on the same clusters": (
            finetune,
            {"MaskPruning": {"start_epoch": 0, "prune_epochs": 0}},
            finetune_only,
            [],
        ),
        "control: retrain on val": (
            config_files(),
            {},
            epochs,
            ["--data.train_split", "val", "--checkpoint.monitor", "null"],
        ),
    }


def _regularize(score: dict[str, dict[str, Any]], changes: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """SCORE's overrides with ``changes`` to NeuronRegularization's arguments."""
    return {**score, "NeuronRegularization": {**score["NeuronRegularization"], **changes}}


def best_checkpoint(run_dir: Path) -> str:
    """The ERM checkpoint the ERM row was tested on (best by val/mean), which every stage starts from."""
    found = [p for p in (run_dir / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]
    if not found:
        raise FileNotFoundError(f"no best checkpoint in {run_dir / 'checkpoints'}")
    return str(max(found, key=lambda p: p.stat().st_mtime))
