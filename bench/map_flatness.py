"""Where a stage made the feature maps flatter: the spatially constant share of each stage's activations.

    python bench/map_flatness.py ERM_CKPT OUT_DIR {background|patch|both} SEED

OUT_DIR is the output of ``bench/stage_from_checkpoint.py prusc ERM_CKPT ... '{"sscore": true, "save":
true, ...}'`` on a stride-8 checkpoint (``"backbone_kwargs": {"output_stride": 8}``). On the s-score
samples of that run (``sscore_before/sscore.json``) this prints, for the ERM model and the model after the
stage, the share of each layer's activation energy that is its per-sample, per-channel mean over space
(1: every map flat), the density of a few weights and the scale of the blocks' last BatchNorms. Not part
of CI.
"""

import json
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from shortcut_lightning import ShortcutClassifier
from shortcut_lightning.data import SyntheticShortcuts

LAYERS = ("act1", "layer1", "layer2", "layer3", "layer4.0.downsample", "layer4")
WEIGHTS = ("layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1", "layer4.0.downsample.0", "layer4.0.conv1")
NORMS = ("layer3.1.bn2", "layer4.0.bn2", "layer4.1.bn2", "layer4.0.downsample.1")


def constant_share(t: Tensor) -> float:
    """Share of the energy of ``t`` [N,C,h,w] in its mean over space."""
    mean = t.mean((2, 3), keepdim=True)
    return float(mean.pow(2).sum() * t.shape[2] * t.shape[3] / t.pow(2).sum().clamp(min=1e-12))


def load(weights: str | Path) -> nn.Module:
    """A stride-8 ResNet-18 from a ShortcutClassifier checkpoint (the loader bakes any PruSC masks in)."""
    return ShortcutClassifier(
        "resnet18", num_classes=2, weights=str(weights), backbone_kwargs={"output_stride": 8}
    ).eval()


def describe(model: nn.Module, images: Tensor) -> str:
    modules = dict(model.net.named_modules())
    captured: dict[str, Tensor] = {}
    hooks = [
        modules[n].register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o.detach().clone()))
        for n in LAYERS
    ]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    flat = " ".join(f"{n} {constant_share(captured[n]):.3f}" for n in LAYERS)
    density = " ".join(f"{n} {float((modules[n].weight != 0).float().mean()):.3f}" for n in WEIGHTS)
    scale = " ".join(f"{n} {float(modules[n].weight.detach().abs().mean()):.3f}" for n in NORMS)
    return f"constant share: {flat}\n  density: {density}\n  BatchNorm |gamma|: {scale}"


def main() -> None:
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    ckpt, out, variant, seed = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    if not (out / "model.ckpt").is_file():
        raise SystemExit(f'{out / "model.ckpt"} is missing: run the stage with "save": true')
    index = json.loads((out / "sscore_before" / "sscore.json").read_text())["sample_index"]
    dm = SyntheticShortcuts(spurious=variant, image_size=32, seed=seed, data_seed=seed)
    dm.setup("fit")
    images = torch.stack([dm.dataset("train")[i]["image"] for i in index])
    print("ERM:", describe(load(ckpt), images))
    print("after the stage:", describe(load(out / "model.ckpt"), images))


if __name__ == "__main__":
    main()
