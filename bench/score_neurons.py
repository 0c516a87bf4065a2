"""How many channels SCORE's mining takes, and what the oracle masks say of them (docs/methods.md, SCORE).

    python -m bench score-neurons --dataset photos_patch --seeds 0 1 2

From each seed's ERM checkpoint of ``python -m bench photos --dataset ...`` (the runs it left), at the mining's
layer (``net.blocks.4``): each channel's s-score, the s-score formula (``xai.score_maps``, alpha 0.5) on the
channel's own activation map (what Grad-CAM gives a pooled neuron) over 100 training images with a spurious
mask; and SCORE's auto mining (a run of one step at strength 0, which the mining precedes). Per seed and class:
how many channels ``num_neurons`` (10), ``z_score`` (1, 2) and ``neuron_share`` (0.1) take from the mining's
scores, and the s-scores of the channels ``num_neurons`` takes against the layer's median.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
from pathlib import Path
from typing import Any

from bench import RESULTS
from bench.photo_rows import best_checkpoint
from bench.quality import run
from bench.stage_configs import config_files, config_with

LAYER = "net.blocks.4"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset", default="photos_patch", choices=("photos", "photos_c100", "photos_patch")
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", default="runs/bench_photos/128px", help="the photo benchmark's runs")
    parser.add_argument("--image-size", type=int, default=128)


def _counts(scores: list[float]) -> dict[str, int]:
    """How many channels each selection rule takes from one class's mining scores."""
    mean, std = statistics.mean(scores), statistics.stdev(scores)
    return {
        "num_neurons 10": 10,
        "z_score 1": sum(s > mean + std for s in scores),
        "z_score 2": sum(s > mean + 2 * std for s in scores),
        "neuron_share 0.1": max(1, math.ceil(0.1 * len(scores))),
    }


def channel_s_scores(checkpoint: str, dataset: str, image_size: int, n: int = 100) -> list[float]:
    """Each channel's s-score at ``LAYER``: its activation map's overlap with the spurious mask, ``n`` images."""
    import torch

    from shortcut_lightning import ShortcutClassifier
    from shortcut_lightning.data import MetadataDataModule
    from shortcut_lightning.probing.hooks import OutputCapture
    from shortcut_lightning.probing.model_parts import find_module
    from shortcut_lightning.xai.gradcam import score_maps

    model = ShortcutClassifier.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    marks = "spurious" if dataset == "photos_patch" else "core"  # the patch, or the animal (as CUB)
    dm = MetadataDataModule(root=f"data/{dataset}", image_size=image_size, mask_marks=marks)
    dm.setup("fit")
    train = dm.dataset("train")
    masked = (sample for sample in (train[i] for i in range(len(train))) if sample["mask"].any())
    picked = list(itertools.islice(masked, n))  # reads images only until n have a mask
    images, masks = torch.stack([s["image"] for s in picked]), torch.stack([s["mask"] for s in picked])
    with torch.no_grad(), OutputCapture(find_module(model, LAYER, "layer")) as capture:
        model(images)
    return score_maps(capture.value.relu(), masks, 0.5)[0].tolist()


def one_seed(dataset: str, seed: int, runs: Path, image_size: int) -> dict[str, Any]:
    """The s-scores and the mining of one seed's ERM checkpoint, side by side."""
    prefix = "" if dataset == "photos" else f"{dataset}_"
    erm = next((runs / f"{prefix}efficientnet_lite0_ERM").glob(f"*/seed{seed}"))
    checkpoint = best_checkpoint(erm)
    extra = ["--data.root", f"data/{dataset}", "--data.image_size", str(image_size)]
    out = runs / f"{prefix}score_neurons"
    mining = config_with(
        config_files(dataset, "score"),
        f"mining_seed{seed}",
        {
            "SpuriousPositiveMining": {"start_epoch": 0, "report_splits": []},
            "NeuronRegularization": {"start_epoch": 0, "strength": 0.0, "penalty": "activation"},
        },
        out / "configs",
        trainer__max_epochs=1,
        trainer__limit_train_batches=1,
        trainer__limit_val_batches=0,
        model__weights=checkpoint,
    )
    run(mining, seed, out / "mining", extra, data_seed=False)
    s_scores = channel_s_scores(checkpoint, dataset, image_size)
    m_dir = next((out / "mining").glob(f"*/seed{seed}"))
    median = statistics.median(s_scores)
    mined = json.loads((m_dir / "mining.json").read_text())
    classes = {}
    for name, entry in mined["classes"].items():
        if not entry.get("layer_scores"):
            continue
        taken = [s_scores[j] for j in entry["neurons"]]
        classes[name] = {
            "channels": len(s_scores),
            "taken": _counts(entry["layer_scores"]),
            "s_score_median_taken": statistics.median(taken),
            "s_score_median_layer": median,
            "taken_above_layer_median": sum(s > median for s in taken),
            "precision_vs_oracle": entry.get("precision_vs_oracle"),
        }
    high = sum(s > 0.7 for s in s_scores)
    return {"classes": classes, "s_score_median_layer": median, "channels_s_score_above_0.7": high}


def main(args: argparse.Namespace) -> None:
    runs = Path(args.runs)
    result = {str(seed): one_seed(args.dataset, seed, runs, args.image_size) for seed in args.seeds}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"score_neurons_{args.dataset}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    print(
        "| seed | class | channels | 10 | z 1 | z 2 | share 0.1 | s-score median: taken / layer | taken above median |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for seed, found in result.items():
        for name, c in found["classes"].items():
            t = c["taken"]
            print(
                f"| {seed} | {name} | {c['channels']} | {t['num_neurons 10']} | {t['z_score 1']} | {t['z_score 2']} | "
                f"{t['neuron_share 0.1']} | {c['s_score_median_taken']:.3f} / {c['s_score_median_layer']:.3f} | "
                f"{c['taken_above_layer_median']} of 10 |"
            )
