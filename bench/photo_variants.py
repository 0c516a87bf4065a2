"""Variants of one stage on the photo benchmark, from the ERM checkpoints of ``make bench-photos``.

    python -m bench photo-variants --variant prusc_batch_bn --seeds 0
    python -m bench photo-variants --list

Each variant (bench/photo_variant_table.py) is a stage of the photo benchmark with some init arguments of its
callbacks changed. It starts from the same ERM checkpoint (best by ``val/mean``) as the suite's rows, runs 2
stage epochs, and prints one line: validation worst-class accuracy (the group-free selection rule: a variant is
chosen by it, never by test) of the last epoch and, where a monitor chose the tested checkpoint, that
checkpoint's score, beside test worst-group and mean accuracy. A PruSC variant also scores the pruned network's
s-scores ("An XAI-based Analysis of Shortcut Learning in Neural Networks": 0.40 -> 0.18 under PruSC). Runs land
in ``runs/photo_variants`` and a finished run is read, not rerun. docs/methods.md's audit table and the
docs/experiments files of 2026-12-04 and 2026-12-05 cite its lines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.photo_rows import STAGE_EPOCHS, best_checkpoint
from bench.photo_variant_table import BN_AFTER, EPOCHS, EXTRA, FROM_IMAGENET, PRUSC, VARIANTS
from bench.quality import run
from bench.run_files import selected_by, tested_checkpoint
from bench.stage_configs import config_with

# the s-score of a PruSC variant's pruned network beside its accuracy
SSCORE_VIEW = {
    "class_path": "shortcut_lightning.callbacks.SpuriousScore",
    "init_args": {"split": "train", "n_samples": 50},
}


def starting_point(name: str, seed: int, erm_runs: Path) -> dict[str, Any]:
    """The variant's epochs and the weights it starts from: the ERM checkpoint, ImageNet (the config's own),
    or the checkpoint another row of the photo benchmark was tested on."""
    if name in FROM_IMAGENET:
        return {}
    erm = next(erm_runs.glob(f"*/seed{seed}"), None)
    if erm is None:
        raise SystemExit(f"no ERM run of seed {seed} in {erm_runs}: run make bench-photos first")
    top = {"trainer__max_epochs": EPOCHS.get(name, STAGE_EPOCHS), "model__weights": best_checkpoint(erm)}
    if name in BN_AFTER:
        row = next(erm_runs.parent.joinpath(BN_AFTER[name]).glob(f"*/seed{seed}"), None)
        if row is None:
            raise SystemExit(f"no run of {BN_AFTER[name]} seed {seed}: run make bench-photos first")
        top["model__weights"] = str(tested_checkpoint(row))
    return top


def one_variant(name: str, seed: int, root: str, erm_runs: Path, runs: Path) -> str:
    """Runs (or reads) one variant of one seed; its line."""
    files, overrides = VARIANTS[name]
    top = starting_point(name, seed, erm_runs)
    append = (SSCORE_VIEW,) if files == PRUSC else ()
    configs = config_with(files, f"{name}_seed{seed}", overrides, runs / "configs", append, **top)
    data = ["--data.root", root, "--data.image_size", "128", *EXTRA.get(name, [])]
    report, _, sscore, seconds = run(configs, seed, runs / name, data, reuse=True, data_seed=False)
    run_dir = next((runs / name).glob(f"*/seed{seed}"))
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
    return (
        f"[variant] {name} seed {seed}: val worst_class {val['worst_class']:.3f} (last epoch){chosen} | "
        f"test wga {report['wga']:.3f} mean {report['mean']:.3f} {extra} ({seconds:.0f} s)"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", nargs="+", default=[])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--root", default="data/photos")
    parser.add_argument("--erm-runs", default="runs/bench_photos/128px/efficientnet_lite0_ERM")
    parser.add_argument("--runs", default="runs/photo_variants")
    parser.add_argument("--list", action="store_true")


def main(args: argparse.Namespace) -> None:
    if args.list or not args.variant:
        print("\n".join(f"{k}: {' + '.join(v[0])} {json.dumps(v[1])}" for k, v in VARIANTS.items()))
        return
    unknown = [name for name in args.variant if name not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; --list shows them")
    for name in args.variant:
        for seed in args.seeds:
            print(one_variant(name, seed, args.root, Path(args.erm_runs), Path(args.runs)), flush=True)
