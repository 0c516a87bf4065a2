"""The scale of the cross-entropy gradient on PruSC's mask logits, per stage of a ResNet-18 checkpoint.

    python bench/mask_gradient_scale.py CKPT {background|patch|both} [--output-stride 8] [--batches 40]

Masks every conv and linear weight as ``MaskPruning`` does (logit 3, straight-through Gumbel-sigmoid,
BatchNorm held in eval mode), runs ``--batches`` training batches (seed 1 of the embedded benchmark)
and prints, per stage, the median over the logits of the absolute mean gradient and the share of
logits whose gradient is exactly 0 on every batch. It asks whether one SGD step size could serve
every layer's logits: the sparsity term's pull on a logit at 3 is ``lambda_sparse * 0.045``.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
import torch.nn.functional as F
from reachable_share import stage_of
from torch.nn.modules.batchnorm import _BatchNorm

from shortcut_lightning import ShortcutClassifier
from shortcut_lightning.data import SyntheticShortcuts
from shortcut_lightning.methods.prusc.masks import attach_masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("variant")
    parser.add_argument("--output-stride", type=int, default=8)
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ShortcutClassifier(
        "resnet18",
        num_classes=2,
        weights=args.checkpoint,
        backbone_kwargs={"output_stride": args.output_stride},
    )
    dm = SyntheticShortcuts(spurious=args.variant, image_size=32, batch_size=64, seed=1, data_seed=1)
    dm.setup("fit")
    masks = attach_masks(model)
    for mask in masks.values():
        mask.set_mode("learn")
    model.train()
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.eval()
    total = {name: torch.zeros_like(m.logits) for name, m in masks.items()}
    touched = {name: torch.zeros_like(m.logits, dtype=torch.bool) for name, m in masks.items()}
    for _, batch in zip(range(args.batches), dm.train_dataloader(), strict=False):
        for mask in masks.values():
            mask.logits.grad = None
        F.cross_entropy(model(batch["image"]), batch["target"]).backward()
        for name, mask in masks.items():
            total[name] += mask.logits.grad
            touched[name] |= mask.logits.grad != 0
    per_stage: dict[str, list[torch.Tensor]] = defaultdict(list)
    zero: dict[str, list[torch.Tensor]] = defaultdict(list)
    for name in masks:
        per_stage[stage_of(name)].append((total[name] / args.batches).abs().flatten())
        zero[stage_of(name)].append(~touched[name].flatten())
    print("| stage | logits | median abs mean gradient | gradient always 0 |")
    print("|---|---|---|---|")
    for stage, parts in per_stage.items():
        grads = torch.cat(parts)
        print(
            f"| {stage} | {len(grads)} | {grads.median():.1e} | {torch.cat(zero[stage]).float().mean():.2f} |"
        )


if __name__ == "__main__":
    main()
