"""The photo variants: each a stage of the photo benchmark with some init arguments of its callbacks changed,
the stage epochs it runs where they are not STAGE_EPOCHS, and the CLI arguments it adds."""

from __future__ import annotations

from typing import Any

from bench.stage_configs import config_files

PRUSC, SCORE, SSCORE = (
    config_files("photos", "prusc"),
    config_files("photos", "score"),
    config_files("photos", "sscore"),
)
ERM, GROUPDRO = config_files("photos"), config_files("photos", "groupdro")
BN, JTT = config_files("photos", "bn_recalibration"), config_files("photos", "jtt")
FINETUNE = config_files("photos", "prusc_finetune")
START = {"start_epoch": 0}
SCORE_START = {"SpuriousPositiveMining": START, "NeuronRegularization": START}
FT2 = {"prune_epochs": 1, "finetune_epochs": 2}  # a variant named *_ft2: 1 mask epoch, 2 fine-tuning epochs
FIXED = {
    "mask_lr": 0.0,
    "init_logit": 50.0,
}  # no mask can move: lr 0, and at logit 50 the noise drops no weight
Variant = tuple[list[str], dict[str, dict[str, Any]]]


def per_class(at: str, k: int) -> dict[str, Any]:
    """PruSC's clusters: ``k`` in each class, at the head's input (``head``) or at ``net.blocks.<n>`` (``blocks<n>``)."""
    layer = {} if at == "head" else {"cluster_layer": f"net.blocks.{at.removeprefix('blocks')}"}
    return {"cluster_within": "class", "num_clusters": k, **layer}


def prusc(**init_args: Any) -> Variant:
    """PruSC from the ERM checkpoint (start_epoch 0) with ``init_args`` changed."""
    return PRUSC, {"MaskPruning": {**START, **init_args}}


def score(mining: dict[str, Any] | None = None, regularization: dict[str, Any] | None = None) -> Variant:
    """SCORE from the ERM checkpoint with its mining's or its regularization's arguments changed."""
    return SCORE, {
        "SpuriousPositiveMining": {**START, **(mining or {})},
        "NeuronRegularization": {**START, **(regularization or {})},
    }


def groupdro(step: float, c: float) -> Variant:
    """GroupDRO with step size ``step`` and group adjustment ``c`` (C / sqrt(n_g))."""
    return GROUPDRO, {"GroupDRO": {"step_size": step, "adjustment": c}}


GRID = [(s, c) for s in (0.01, 0.1, 1.0) for c in (0.0, 2.0)] + [(3.0, 2.0), (1.0, 4.0)]
CLUSTERS = [(at, k) for at in ("head", "blocks4", "blocks3") for k in (4, 8)]
# name -> (config files, callback init_args by class name); the stage starts from ERM unless FROM_IMAGENET
VARIANTS: dict[str, Variant] = {
    "prusc": prusc(),
    "prusc_batch_bn": prusc(batchnorm="batch"),
    # batch statistics gathered under the noisy training masks, re-estimated once the masks are fixed
    "prusc_batch_bn_recal": prusc(batchnorm="batch", recalibrate_bn=True),
    "prusc_recal": prusc(recalibrate_bn=True),
    # control: no mask can move, then the same re-estimation of BatchNorm's statistics (train split, evaluation
    # transforms): what recalibration alone does
    "bn_recal_only": prusc(**FIXED, recalibrate_bn=True),
    "prusc_val": prusc(split="val"),
    "prusc_val_batch_bn": prusc(split="val", batchnorm="batch"),
    # val has 600 images (19 steps an epoch): 6 epochs are about the steps of 2 train epochs, and the masks
    # need about 60 Adam steps of 0.05 to move a logit from 3 to 0; no monitor (it would select on training data)
    "prusc_val_6": prusc(split="val", prune_epochs=6, monitor=None),
    "prusc_logit_sparsity": prusc(sparsity="logit", mask_lr=0.01, init_logit=1.5),
    # the same with 6 mask epochs: at 0.01 a step a logit needs about 150 steps (2.4 epochs on train) to reach 0
    "prusc_logit_sparsity_6": prusc(sparsity="logit", mask_lr=0.01, init_logit=1.5, prune_epochs=6),
    # PruSC's masks (2 epochs on train), then 2 epochs retraining the surviving weights on val (released code)
    "prusc_retrain": prusc(finetune_epochs=2, finetune_split="val"),
    # clusters that can find the minority groups: k-means within each class, on an intermediate stage's pooled
    # output (the penultimate embedding of the pretrained ERM model clusters by animal, not by place)
    **{f"prusc_{at}_class{k}": prusc(**per_class(at, k)) for at, k in CLUSTERS},
    # PruSC's step 4: 1 mask epoch, then 2 epochs fine-tuning the surviving weights on train, cluster-balanced;
    # on the paper's clusters (12 over the split, the penultimate embedding) and on the per-class ones
    "prusc_ft2": prusc(**FT2),
    **{f"prusc_{at}_class{k}_ft2": prusc(**per_class(at, k), **FT2) for at, k in CLUSTERS},
    # the paper's clusters with the config's selection rule (finetune_keep best): does the rule alone rescue them?
    "prusc_keep_best_ft2": prusc(**FT2, finetune_keep="best"),
    # PruSC + fine-tuning with 4 fine-tuning epochs: the runs by which validation chose the config's 4 over 2
    "prusc_finetune_ft4": (FINETUNE, {"MaskPruning": {**START, "finetune_epochs": 4}}),
    # and its control: the same fine-tuning with no mask that can move
    "clusters_blocks4_class8_ft2": prusc(**per_class("blocks4", 8), **FT2, **FIXED),
    "sscore_erm": (SSCORE, {}),  # the ERM model's s-score views (no training)
    "score": score(),
    "score_blocks3": score({"layer": "net.blocks.3"}, {"finetune_from": "net.blocks.3"}),
    "score_blocks5": score({"layer": "net.blocks.5"}, {"finetune_from": "net.blocks.5"}),
    "score_strength0": score(regularization={"strength": 0.0}),
    "score_strength100": score(regularization={"strength": 100.0}),
    "score_strength1000": score(regularization={"strength": 1000.0}),
    "score_pairs": score(regularization={"regularize_on": "pairs"}),
    # the fine-tuning draw class-balanced (the "class-balanced draw of the rest"), and its control:
    # ERM continued with the same draw, so that a gain of the draw alone is not credited to SCORE
    "score_class_balanced": score(),
    "erm_class_balanced": (ERM, {}),
    "erm_continued": (
        ERM,
        {},
    ),  # the suite's control, for variants run on other ERM checkpoints than the table's
    # JTT's up-weighting by reweighted draws in epochs of the split's length (session 33's form)
    "jtt_upweight5": (JTT, {"JustTrainTwice": {"upweight": 5.0, "draw": "reweight"}}),
    "jtt_upweight50": (JTT, {"JustTrainTwice": {"upweight": 50.0, "draw": "reweight"}}),
    # the paper's upsampled epochs (each error-set image upweight times, every other once): longer epochs, with
    # a loader rebuilt every epoch (jtt.yaml's reload_dataloaders_every_n_epochs)
    "jtt_upsample20": (JTT, {"JustTrainTwice": {"upweight": 20, "draw": "upsample"}}),
    "jtt_upsample50": (JTT, {"JustTrainTwice": {"upweight": 50, "draw": "upsample"}}),
    # GroupDRO by the paper's protocol (train and val groups): the checkpoint and (step_size, C) chosen by
    # val worst-group accuracy; C / sqrt(n_g) is the group adjustment
    **{f"groupdro_step{step:g}_c{c:g}": groupdro(step, c) for step, c in GRID},
    # groupdro.yaml as a user runs it: 3 epochs from ImageNet, the paper's settings against the preset's
    "groupdro_imagenet_step0.01_c0": groupdro(0.01, 0.0),
    "groupdro_imagenet_step1_c2": groupdro(1.0, 2.0),
    # the paper's code samples the groups uniformly as well (--reweight_groups --robust): the preset with that draw
    "groupdro_imagenet_group_balanced": (GROUPDRO, {}),
    # BatchNorm re-estimated (no training) after another row of the suite: does the control's gain stack?
    **{f"bn_after_{key}": (BN, {}) for key in ("SCORE_auto", "JTT", "GroupDRO", "control_ERM_continued")},
}
# bn_after_<row>: from the checkpoint that row of `python -m bench photos` was tested on, not from ERM
BN_AFTER = {
    name: f"efficientnet_lite0_{name.removeprefix('bn_after_')}"
    for name in VARIANTS
    if name.startswith("bn_after_")
}
# the config's own epochs from ImageNet, like the JTT row
FROM_IMAGENET = {
    *(f"jtt_{form}" for form in ("upweight5", "upweight50", "upsample20", "upsample50")),
    *(f"groupdro_imagenet_{form}" for form in ("step0.01_c0", "step1_c2", "group_balanced")),
}
EXTRA = {  # more CLI arguments of a variant
    "score_class_balanced": ["--data.sampler", "class_balanced"],
    "erm_class_balanced": ["--data.sampler", "class_balanced"],
    "groupdro_imagenet_group_balanced": ["--data.sampler", "group_balanced"],
    **{name: ["--checkpoint.monitor", "val/wga"] for name in VARIANTS if name.startswith("groupdro_step")},
}
EPOCHS = {
    **dict.fromkeys(BN_AFTER, 0),
    "prusc_val_6": 6,
    "prusc_logit_sparsity_6": 6,
    "prusc_retrain": 4,
    "prusc_finetune_ft4": 5,
    **{name: sum(FT2.values()) for name in VARIANTS if name.endswith("_ft2")},
    "sscore_erm": 0,
}  # stage epochs where a variant needs other than STAGE_EPOCHS
