"""Speed ratios, each measured against its baseline in the same run. ``make bench`` (through the suite).

    python -m bench speed [--only erm,dfr,...] [--repeats 3]

- ``erm``: an ERM epoch through the Lightning stack (ShortcutClassifier + Trainer, progress bar and logging on)
  vs a plain PyTorch loop over the same model, data, batches and optimizer; and the same Lightning epoch with
  ``FiniteLoss`` (the CLI's per-step check of the loss) against it. Runs alternate; the ratio compares the
  fastest run of each side (other load on a shared machine only adds time, so the minimum estimates each loop's
  own cost, as ``timeit`` does), the ratio of medians is kept beside it. Target <= 1.05 (bench/speed_epochs.py).
- ``dfr``: the DFR refit (C tuning + 20 refits, embeddings given) vs one ERM training epoch (plain loop) on the
  embedded default's training set, the fits in one process and in one per core. Target <= 0.10. AFR's refit
  (the (gamma, L2) grid cross-fitted, then the final fit) on the same embeddings against the same epoch:
  target <= 1 (bench/speed_refits.py).
- ``baselines``: GroupDRO and JTT epochs vs an ERM epoch (bench/speed_baselines.py). Target <= 1.05.
- ``sscore``: s-scores of all 512 penultimate neurons of a ResNet-18 over 50 masked samples, our one-pass
  Grad-CAM vs looping captum's LayerGradCam over the neurons (scores compared). Target >= 100x.
- ``score``: a SCORE-regularized training epoch (10 penalised neurons of layer4) vs a plain ERM epoch through
  the same Lightning stack (target <= 1.10); SCORE mining over 2 x 100 samples (ranking pass, LRP, masked
  images, auto selection) vs one ERM epoch on the default training set (target <= 1).
- ``prusc``: a PruSC mask-learning step vs an ERM step on the same batch, alternating; medians compared; at
  32 px (batch 64), where the per-weight mask work dominates, and at 224 px (batch 16). Target <= 1.5.
- ``lrp``: LRP input-relevance throughput (EpsilonPlusFlat, timm canonizers, batch 32) vs forward-only
  throughput of the same model and batch (``--backbone`` at ``--lrp-size``). Target >= 0.3x.
- ``lrp_efficientnet``: the same for efficientnet_lite0 at 128 px (the pretrained regime's network: BatchNormAct
  merging, depthwise WSquare, canonized inverted-residual adds). Target >= 0.3x.
- ``attnlrp``: the same for a timm ViT (``--vit``, default vit_tiny_patch16_224 at 224 px): AttnLRP (ViT
  canonizer, LayerNorm and attention rules) vs forward-only. Target >= 0.25x.

Each benchmark writes bench/results/speed_<name>_<device>.json, which the suite's speed table reads.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bench import RESULTS

BENCHMARKS = "erm,dfr,baselines,sscore,score,prusc,lrp,lrp_efficientnet,attnlrp"


def _write(name: str, result: Any) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))


def _dfr(args: argparse.Namespace, device: str) -> None:
    from bench.speed_refits import bench_dfr

    r = bench_dfr(args.backbone, device, args.repeats)
    _write(f"speed_dfr_{device}", r)
    print(f"\nDFR refit ({r['n_refit']} x {r['features']} embeddings) vs ERM epoch ({r['n_train']} images)")
    print(f"ERM epoch      {r['erm_epoch_s']:.2f} s")
    print(f"DFR refit      {r['refit_s']:.2f} s")
    print(
        f"ratio          {r['ratio']:.3f}  (target <= 0.10; {r['workers']} workers; one process {r['sequential_ratio']:.3f})"
    )
    print(f"AFR refit      {r['afr_refit_s']:.2f} s, ratio {r['afr_ratio']:.3f}  (target <= 1)")


def _baselines(args: argparse.Namespace, device: str) -> None:
    from bench.speed_baselines import bench_baselines

    r = bench_baselines(args.backbone, device, args.repeats, args.n, args.image_size)
    _write(f"speed_baselines_{device}", r)
    print(f"\nGroupDRO / JTT epoch vs ERM epoch ({args.backbone}, {args.n} images, {device})")
    print(f"GroupDRO       {r['groupdro_ratio']:.3f}  (target <= 1.05)")
    identify = f"identification pass {r['jtt_identify_ratio']:.2f} of an ERM epoch"
    print(f"JTT            {r['jtt_ratio']:.3f}  (target <= 1.05); {identify}")


def _sscore(args: argparse.Namespace, device: str) -> None:
    from bench.speed_attribution import bench_sscore

    r = bench_sscore(args.sscore_neurons)
    _write("speed_sscore_cpu", r)
    print(f"\ns-score, {r['neurons']} neurons x {r['samples']} samples ({r['image_size']} px)")
    print(f"one pass       {r['ours_s']:.2f} s")
    print(f"captum loop    {r['captum_s']:.2f} s")
    difference = f"max |score difference| {r['max_abs_score_difference']:.2e}"
    print(f"speed-up       {r['speedup']:.0f}x  (target >= 100), {difference}")


def _score(args: argparse.Namespace, device: str) -> None:
    from bench.speed_score import bench_score

    r = bench_score(args.backbone, device, args.repeats, args.n, args.image_size)
    _write(f"speed_score_{device}", r)
    print(f"\nSCORE ({args.backbone}, {device})")
    print(f"regularized epoch / ERM epoch   {r['step_ratio']:.3f}  (target <= 1.10)")
    print(f"  penalty contribution          {r['contribution_ratio']:.3f}")
    print(f"  penalty masked_logit          {r['masked_logit_ratio']:.3f}")
    mining = f"mining {r['mining_s']:.1f} s / ERM epoch {r['erm_epoch_full_train_s']:.1f} s"
    print(f"{mining} = {r['mining_ratio']:.2f}  (target <= 1)")


def _prusc(args: argparse.Namespace, device: str) -> None:
    """Small images, where the weights dominate (worst case), and 224 px (the usual case)."""
    from bench.speed_prusc import bench_prusc

    results = [
        bench_prusc(args.backbone, device, 10 * args.repeats, args.image_size, batch=64),
        bench_prusc(args.backbone, device, 3 * args.repeats, 224, batch=16),
    ]
    if args.large_batch:
        results.append(bench_prusc(args.backbone, device, 3 * args.repeats, 224, batch=args.large_batch))
    _write(f"speed_prusc_{device}", results)
    for r in results:
        print(
            f"\nPruSC mask step vs ERM step ({args.backbone}, batch {r['batch']} at {r['image_size']} px, {device})"
        )
        print(f"ERM step       {r['erm_step_s'] * 1000:.1f} ms")
        print(f"mask step      {r['mask_step_s'] * 1000:.1f} ms")
        print(f"ratio          {r['ratio']:.3f}  (target <= 1.5)")


def _lrp(args: argparse.Namespace, device: str, only: set[str]) -> None:
    from bench.speed_attribution import bench_lrp

    runs = [(args.backbone, args.lrp_size, 32)] if "lrp" in only else []
    if "lrp_efficientnet" in only and ("efficientnet_lite0", 128, 32) not in runs:
        runs.append(("efficientnet_lite0", 128, 32))
    if args.large_batch:
        runs += [(b, 224, args.large_batch) for b in (args.backbone, "efficientnet_lite0") if runs]
    for backbone, size, batch in runs:
        r = bench_lrp(backbone, size, args.repeats, device=device, batch=batch)
        tag = ("" if backbone == "resnet18" else f"_{backbone}") + (
            "" if batch == 32 else f"_b{batch}_{size}px"
        )
        _write(f"speed_lrp{tag}_{device}", r)
        _print_lrp(r, "LRP", ">= 0.3")


def _attnlrp(args: argparse.Namespace, device: str) -> None:
    from bench.speed_attribution import bench_lrp

    r = bench_lrp(args.vit, args.lrp_size, args.repeats, goal=">= 0.25", device=device)
    _write(f"speed_attnlrp_{device}", r)
    _print_lrp(r, "AttnLRP", ">= 0.25")


def _print_lrp(r: dict[str, Any], what: str, target: str) -> None:
    print(f"\n{what} vs forward ({r['backbone']}, batch {r['batch']} at {r['image_size']} px, {r['device']})")
    print(f"forward        {r['forward_img_per_s']:.1f} img/s")
    print(f"{what:<15}{r['lrp_img_per_s']:.1f} img/s")
    print(f"ratio          {r['ratio']:.3f}  (target {target})")


def _erm(args: argparse.Namespace, device: str) -> None:
    from bench.speed_epochs import bench_erm

    r = bench_erm(args.backbone, device, args.repeats, args.n, args.image_size)
    _write(f"speed_erm_{device}", r)
    print(f"\nERM epoch ({args.backbone}, {args.n} images at {args.image_size}px, {device})")
    print(f"plain loop     {r['plain_s']:.2f} s")
    print(f"Lightning      {r['lightning_s']:.2f} s")
    print(
        f"ratio          {r['ratio']:.3f}  (fastest runs; target <= 1.05), medians {r['ratio_of_medians']:.3f}"
    )
    print(
        f"FiniteLoss     {r['finite_loss_ratio']:.3f} of the Lightning epoch (its per-step check of the loss)"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--n", type=int, default=1280, help="training samples per ERM epoch (erm)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=BENCHMARKS, help="comma-separated benchmarks to run")
    parser.add_argument("--vit", default="vit_tiny_patch16_224", help="backbone of the attnlrp benchmark")
    parser.add_argument("--lrp-size", type=int, default=224, help="image side for the lrp benchmark")
    parser.add_argument("--sscore-neurons", type=int, default=None, help="captum loop over this many neurons")
    parser.add_argument(
        "--large-batch",
        type=int,
        default=None,
        help="also time the PruSC step and LRP at 224 px with this batch (e.g. 128, a realistic GPU batch)",
    )


def main(args: argparse.Namespace) -> None:
    import torch

    only = set(args.only.split(","))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = {"dfr": _dfr, "baselines": _baselines, "sscore": _sscore, "score": _score, "prusc": _prusc}
    for name, step in steps.items():
        if name in only:
            step(args, device)
    _lrp(args, device, only)
    if "attnlrp" in only:
        _attnlrp(args, device)
    if "erm" in only:
        _erm(args, device)
