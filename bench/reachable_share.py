"""How much of a ResNet-18 can read an image pixel at a given size, and how much of that a pruned model kept.

    python -m bench reachable-share [--size 32] [--output-stride 32] [MODEL_CKPT ...]

Prints, per convolution stage, the share of the weights whose kernel taps reach a real input position
(``conv_reach.reachable_weights``; the others multiply only zero padding). For each checkpoint (a
pruned model with its masks baked in, e.g. ``pruned.ckpt`` or ``python -m bench stage``'s ``"save": true``
output), it prints Prune_f over all conv and linear weights and over the reachable ones, counting a weight as
pruned when it is exactly 0. docs/methods.md (PruSC: what can read a pixel at 32 px) cites its table.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch import nn

from shortcut_lightning import ShortcutClassifier
from shortcut_lightning.methods.prusc.conv_reach import reachable_of, reachable_weights
from shortcut_lightning.methods.prusc.masks import maskable_modules


def stage_of(name: str) -> str:
    """The ResNet stage a weight belongs to (``layer1`` ... ``layer4``), else the stem and head."""
    parts = name.split(".")
    return parts[1] if len(parts) > 2 and parts[1].startswith("layer") else "stem and head"


def shares(model: nn.Module, size: int) -> dict[str, tuple[int, int, int, int]]:
    """Per stage: (weights, reachable, pruned, pruned among reachable)."""
    reach = reachable_weights(model, torch.zeros(1, 3, size, size))
    found: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for name, module in maskable_modules(model).items():
        weight = module.weight.detach()
        live = reachable_of(reach, name, weight)
        zero = weight == 0
        row = found[stage_of(name)]
        row[0] += weight.numel()
        row[1] += int(live.sum())
        row[2] += int(zero.sum())
        row[3] += int((zero & live).sum())
    return {k: tuple(v) for k, v in found.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="*", help="pruned models' checkpoints")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--output-stride", type=int, default=32)


def main(args: argparse.Namespace) -> None:
    kwargs = {"output_stride": args.output_stride}
    for ckpt in [None, *args.checkpoints]:
        model = ShortcutClassifier("resnet18", num_classes=2, weights=ckpt, backbone_kwargs=kwargs).eval()
        table = shares(model, args.size)
        print(f"\n{ckpt or 'resnet18'} at {args.size} px, output stride {args.output_stride}")
        print("| stage | weights | reachable | Prune_f share | Prune_f of the reachable |")
        print("|---|---|---|---|---|")
        sums = [0, 0, 0, 0]
        for stage, (n, live, zero, zero_live) in table.items():
            print(f"| {stage} | {n} | {live / n:.3f} | {zero / n:.3f} | {zero_live / max(live, 1):.3f} |")
            sums = [a + b for a, b in zip(sums, (n, live, zero, zero_live), strict=True)]
        n, live, zero, zero_live = sums
        print(f"| all | {n} | {live / n:.3f} | {zero / n:.3f} | {zero_live / max(live, 1):.3f} |")
