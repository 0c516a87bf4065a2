"""Variants of one stage on the photo benchmark, from the ERM checkpoints of ``make bench-photos``.

    python bench/photo_variants.py --variant prusc_batch_bn --seeds 0
    python bench/photo_variants.py --list

Each variant is a stage config of ``bench/photos.py`` with some init arguments of its callbacks changed.
It starts from the same ERM checkpoint (best by ``val/mean``) as the suite's rows, runs 2 stage epochs, and
prints one line: validation worst-class accuracy (the group-free selection rule: a variant is chosen by it,
never by test) of the last epoch and, where a monitor chose the tested checkpoint, that checkpoint's score,
beside test worst-group and mean accuracy. Runs land in ``runs/photo_variants`` and a
finished run is read, not rerun. The figures go into docs/experiments by hand, with this command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from photos import STAGE_EPOCHS, best_checkpoint
from quality import run, selected_by, tested_checkpoint
from suite import config_with

PRUSC, SCORE, SSCORE = "configs/photos_prusc.yaml", "configs/photos_score.yaml", "configs/photos_sscore.yaml"
ERM = "configs/photos_erm.yaml"
GROUPDRO = "configs/photos_groupdro.yaml"
BN = "configs/photos_bn_recalibration.yaml"
START = {"MaskPruning": {"start_epoch": 0}}
SCORE_START = {"SpuriousPositiveMining": {"start_epoch": 0}, "NeuronRegularization": {"start_epoch": 0}}
FT2 = {"prune_epochs": 1, "finetune_epochs": 2}  # a variant named *_ft2: 1 mask epoch, 2 fine-tuning epochs


def _per_class(at: str, k: int) -> dict:
    """PruSC's clusters: ``k`` in each class, at the head's input (``head``) or at ``net.blocks.<n>`` (``blocks<n>``)."""
    return {"cluster_within": "class", "num_clusters": k,
            **({} if at == "head" else {"cluster_layer": f"net.blocks.{at.removeprefix('blocks')}"})}  # fmt: skip


# name -> (config, callback init_args by class name); start_epoch 0 everywhere (the stage starts from ERM)
VARIANTS: dict[str, tuple[str, dict[str, dict]]] = {
    "prusc": (PRUSC, START),
    "prusc_batch_bn": (PRUSC, {"MaskPruning": {"start_epoch": 0, "batchnorm": "batch"}}),
    # batch statistics gathered under the noisy training masks, re-estimated once the masks are fixed
    "prusc_batch_bn_recal": (PRUSC, {"MaskPruning": {"start_epoch": 0, "batchnorm": "batch", "recalibrate_bn": True}}),
    "prusc_recal": (PRUSC, {"MaskPruning": {"start_epoch": 0, "recalibrate_bn": True}}),
    # control: no mask can move (lr 0, logit 50: the Gumbel noise never drops a weight), then the same
    # re-estimation of BatchNorm's statistics (train split, evaluation transforms): what recalibration alone does
    "bn_recal_only": (PRUSC, {"MaskPruning": {"start_epoch": 0, "mask_lr": 0.0, "init_logit": 50.0, "recalibrate_bn": True}}),
    "prusc_val": (PRUSC, {"MaskPruning": {"start_epoch": 0, "split": "val"}}),
    "prusc_val_batch_bn": (PRUSC, {"MaskPruning": {"start_epoch": 0, "split": "val", "batchnorm": "batch"}}),
    # val has 600 images (19 steps an epoch): 6 epochs are about the steps of 2 train epochs, and the masks
    # need about 60 Adam steps of 0.05 to move a logit from 3 to 0; no monitor (it would select on training data)
    "prusc_val_6": (PRUSC, {"MaskPruning": {"start_epoch": 0, "split": "val", "prune_epochs": 6, "monitor": None}}),
    "prusc_logit_sparsity": (
        PRUSC, {"MaskPruning": {"start_epoch": 0, "sparsity": "logit", "mask_lr": 0.01, "init_logit": 1.5}}),
    # the same with 6 mask epochs: at 0.01 a step a logit needs about 150 steps (2.4 epochs on train) to reach 0
    "prusc_logit_sparsity_6": (PRUSC, {"MaskPruning": {
        "start_epoch": 0, "sparsity": "logit", "mask_lr": 0.01, "init_logit": 1.5, "prune_epochs": 6}}),
    # PruSC's masks (2 epochs on train), then 2 epochs retraining the surviving weights on val (released code)
    "prusc_retrain": (PRUSC, {"MaskPruning": {"start_epoch": 0, "finetune_epochs": 2, "finetune_split": "val"}}),
    # clusters that can find the minority groups: k-means within each class, on an intermediate stage's pooled
    # output (the penultimate embedding of the pretrained ERM model clusters by animal, not by place)
    **{f"prusc_{at}_class{k}": (PRUSC, {"MaskPruning": {"start_epoch": 0, **_per_class(at, k)}})
       for at in ("head", "blocks4", "blocks3") for k in (4, 8)},
    # PruSC's step 4: 1 mask epoch, then 2 epochs fine-tuning the surviving weights on train, cluster-balanced;
    # on the paper's clusters (12 over the split, the penultimate embedding) and on the per-class ones
    "prusc_ft2": (PRUSC, {"MaskPruning": {"start_epoch": 0, **FT2}}),
    **{f"prusc_{at}_class{k}_ft2": (PRUSC, {"MaskPruning": {"start_epoch": 0, **_per_class(at, k), **FT2}})
       for at in ("head", "blocks4", "blocks3") for k in (4, 8)},
    # the paper's clusters with the config's selection rule (finetune_keep best): does the rule alone rescue them?
    "prusc_keep_best_ft2": (PRUSC, {"MaskPruning": {"start_epoch": 0, **FT2, "finetune_keep": "best"}}),
    # PruSC + fine-tuning with 4 fine-tuning epochs: the runs by which validation chose the config's 4 over 2 (session 40)
    "prusc_finetune_ft4": ("configs/photos_prusc_finetune.yaml", {"MaskPruning": {"start_epoch": 0, "finetune_epochs": 4}}),
    # and its control: the same fine-tuning with no mask that can move (lr 0, logit 50)
    "clusters_blocks4_class8_ft2": (PRUSC, {"MaskPruning": {
        "start_epoch": 0, **_per_class("blocks4", 8), **FT2, "mask_lr": 0.0, "init_logit": 50.0}}),
    "sscore_erm": (SSCORE, {}),  # the ERM model's s-score views (no training)
    "score": (SCORE, SCORE_START),
    "score_blocks3": (SCORE, {"SpuriousPositiveMining": {"start_epoch": 0, "layer": "net.blocks.3"},
                              "NeuronRegularization": {"start_epoch": 0, "finetune_from": "net.blocks.3"}}),
    "score_blocks5": (SCORE, {"SpuriousPositiveMining": {"start_epoch": 0, "layer": "net.blocks.5"},
                              "NeuronRegularization": {"start_epoch": 0, "finetune_from": "net.blocks.5"}}),
    "score_strength0": (SCORE, {**SCORE_START, "NeuronRegularization": {"start_epoch": 0, "strength": 0.0}}),
    "score_strength100": (SCORE, {**SCORE_START, "NeuronRegularization": {"start_epoch": 0, "strength": 100.0}}),
    "score_strength1000": (SCORE, {**SCORE_START, "NeuronRegularization": {"start_epoch": 0, "strength": 1000.0}}),
    "score_pairs": (SCORE, {**SCORE_START, "NeuronRegularization": {"start_epoch": 0, "regularize_on": "pairs"}}),
    # the fine-tuning draw class-balanced (the "class-balanced draw of the rest"), and its control:
    # ERM continued with the same draw, so that a gain of the draw alone is not credited to SCORE
    "score_class_balanced": (SCORE, SCORE_START),
    "erm_class_balanced": (ERM, {}),
    "erm_continued": (ERM, {}),  # the suite's control, for variants run on other ERM checkpoints than the table's
    # JTT's up-weighting by reweighted draws in epochs of the split's length (session 33's form)
    "jtt_upweight5": ("configs/photos_jtt.yaml", {"JustTrainTwice": {"upweight": 5.0, "draw": "reweight"}}),
    "jtt_upweight50": ("configs/photos_jtt.yaml", {"JustTrainTwice": {"upweight": 50.0, "draw": "reweight"}}),
    # the paper's upsampled epochs (each error-set image upweight times, every other once): longer epochs
    "jtt_upsample20": ("configs/photos_jtt.yaml", {"JustTrainTwice": {"upweight": 20, "draw": "upsample"}}),
    "jtt_upsample50": ("configs/photos_jtt.yaml", {"JustTrainTwice": {"upweight": 50, "draw": "upsample"}}),
    # GroupDRO by the paper's protocol (train and val groups): the checkpoint and (step_size, C) chosen by
    # val worst-group accuracy; C / sqrt(n_g) is the group adjustment
    **{f"groupdro_step{step:g}_c{c:g}": (GROUPDRO, {"GroupDRO": {"step_size": step, "adjustment": c}})
       for step, c in [(s, c) for s in (0.01, 0.1, 1.0) for c in (0.0, 2.0)] + [(3.0, 2.0), (1.0, 4.0)]},
    # photos_groupdro.yaml as a user runs it: 3 epochs from ImageNet, the paper's settings against the preset's
    "groupdro_imagenet_step0.01_c0": (GROUPDRO, {"GroupDRO": {"step_size": 0.01, "adjustment": 0.0}}),
    "groupdro_imagenet_step1_c2": (GROUPDRO, {"GroupDRO": {"step_size": 1.0, "adjustment": 2.0}}),
    # the paper's code samples the groups uniformly as well (--reweight_groups --robust): the preset with that draw
    "groupdro_imagenet_group_balanced": (GROUPDRO, {}),
    # BatchNorm re-estimated (no training) after another row of the suite: does the control's gain stack?
    **{f"bn_after_{key}": (BN, {}) for key in ("SCORE_auto", "JTT", "GroupDRO", "control_ERM_continued")},
}  # fmt: skip
# bn_after_<row>: from the checkpoint that row of bench/photos.py was tested on, not from ERM
BN_AFTER = {
    name: f"efficientnet_lite0_{name.removeprefix('bn_after_')}"
    for name in VARIANTS
    if name.startswith("bn_after_")
}
# the config's own epochs from ImageNet, like the JTT row
FROM_IMAGENET = {"jtt_upweight5", "jtt_upweight50", "jtt_upsample20", "jtt_upsample50",
                 "groupdro_imagenet_step0.01_c0", "groupdro_imagenet_step1_c2", "groupdro_imagenet_group_balanced"}  # fmt: skip
RELOAD = ["--trainer.reload_dataloaders_every_n_epochs", "1"]  # upsampled epochs change the loader's length
EXTRA = {  # more CLI arguments of a variant (the reload is photos_jtt.yaml's own now; kept: the runs were made so)
    "jtt_upsample20": RELOAD,
    "jtt_upsample50": RELOAD,
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", nargs="+", default=[])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--root", default="data/photos")
    parser.add_argument("--erm-runs", default="runs/bench_photos/128px/efficientnet_lite0_ERM")
    parser.add_argument("--runs", default="runs/photo_variants")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list or not args.variant:
        print("\n".join(f"{k}: {v[0]} {json.dumps(v[1])}" for k, v in VARIANTS.items()))
        return
    for name in args.variant:
        if name not in VARIANTS:
            sys.exit(f"unknown variant {name!r}; --list shows them")
        config, overrides = VARIANTS[name]
        for seed in args.seeds:
            erm = next(Path(args.erm_runs).glob(f"*/seed{seed}"), None)
            if erm is None:
                sys.exit(f"no ERM run of seed {seed} in {args.erm_runs}: run make bench-photos first")
            top = {
                "trainer__max_epochs": EPOCHS.get(name, STAGE_EPOCHS),
                "model__weights": best_checkpoint(erm),
            }
            if name in FROM_IMAGENET:
                top = {}
            if name in BN_AFTER:
                row = next(Path(args.erm_runs).parent.joinpath(BN_AFTER[name]).glob(f"*/seed{seed}"), None)
                if row is None:
                    sys.exit(f"no run of {BN_AFTER[name]} seed {seed}: run make bench-photos first")
                top["model__weights"] = str(tested_checkpoint(row))
            path = config_with(config, f"{name}_seed{seed}", overrides, Path(args.runs) / "configs", **top)
            if (
                config == PRUSC
            ):  # the s-score of the pruned network beside its accuracy (seed 001's 0.40 -> 0.18)
                data_ = yaml.safe_load(Path(path).read_text())
                data_["trainer"]["callbacks"].append({"class_path": "shortcut_lightning.callbacks.SpuriousScore",
                                                      "init_args": {"split": "train", "n_samples": 50}})  # fmt: skip
                Path(path).write_text(yaml.safe_dump(data_))
            data = ["--data.root", args.root, "--data.image_size", "128", *EXTRA.get(name, [])]
            report, _, sscore, seconds = run(
                path, seed, Path(args.runs) / name, data, reuse=True, data_seed=False
            )
            run_dir = next((Path(args.runs) / name).glob(f"*/seed{seed}"))
            val_file = run_dir / "metrics_val.json"  # absent where the stage trains no epoch
            val = json.loads(val_file.read_text()) if val_file.is_file() else {"worst_class": float("nan")}
            extra = {k: report[k] for k in ("Prune_f", "Prune_h", "final_val_worst_class") if k in report}
            if (run_dir / "bn_recalibration.json").is_file():  # the re-estimated model on val
                bn = json.loads((run_dir / "bn_recalibration.json").read_text())
                extra["final_val_worst_class"] = bn["after"]["val"]["worst_class"]
            if sscore is not None:
                extra["sscore_views"] = sscore["views"]
            monitor, score = selected_by(run_dir)  # the tested checkpoint's score, where a monitor chose it
            chosen = f" | tested checkpoint's {monitor} {score:.3f}" if monitor else ""
            print(f"[variant] {name} seed {seed}: val worst_class {val['worst_class']:.3f} (last epoch){chosen} | "
                  f"test wga {report['wga']:.3f} mean {report['mean']:.3f} {extra} ({seconds:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
