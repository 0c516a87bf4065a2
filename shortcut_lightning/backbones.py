"""Building timm backbones from a name and, optionally, a local weights file (never a hub download)."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from shortcut_lightning.errors import ModelError
from shortcut_lightning.masks import attach_masks, bake_masks


def create_backbone(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    weights: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model(name)`` with our errors: unknown names get suggestions, weights come from disk.

    ``weights`` is a backbone state dict (``.pth``, ``.bin`` or ``.safetensors``, e.g. ImageNet weights
    saved once with timm); a classifier of another size is dropped and re-initialised. ``pretrained``
    without ``weights`` is refused rather than downloading.
    """
    if not timm.is_model(name.split(".")[0]):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ModelError(
            f"unknown backbone {name!r}: {hint}model.backbone takes any name of timm.list_models() "
            "(e.g. resnet18, resnet50, vit_tiny_patch16_224)"
        )
    if weights is None:
        if pretrained:
            raise ModelError(
                "model.pretrained=true needs model.weights=<local file>: this library never downloads weights. "
                "Save them once where you have a network (timm.create_model(name, pretrained=True).state_dict()) "
                "and pass the file"
            )
        return timm.create_model(name, num_classes=num_classes, pretrained=False, **kwargs)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelError(
            f"model.weights file {path} does not exist: give the path of a saved backbone state dict"
        )
    if path.suffix == ".ckpt":
        return _from_lightning_checkpoint(path, name, num_classes, **kwargs)
    try:
        return timm.create_model(
            name,
            num_classes=num_classes,
            pretrained=True,
            pretrained_cfg_overlay={"file": str(path)},
            **kwargs,
        )
    except RuntimeError as exc:
        raise ModelError(f"model.weights {path} do not fit backbone {name!r}: {exc}") from exc


def _from_lightning_checkpoint(path: Path, name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """The network of a ShortcutClassifier checkpoint (its ``net.*`` weights, head included; masks multiplied in)."""
    state = torch.load(path, map_location="cpu", weights_only=False).get("state_dict", {})
    net = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    if not net:
        raise ModelError(f"model.weights {path} holds no ShortcutClassifier network (no 'net.*' weights)")
    model = timm.create_model(name, num_classes=num_classes, pretrained=False, **kwargs)
    suffix = ".parametrizations.weight.original"
    masked = sorted(k.removesuffix(suffix) for k in net if k.endswith(suffix))  # layers under a PruSC mask
    try:
        if masked:
            attach_masks(model, masked)
        model.load_state_dict(net)
    except (RuntimeError, ModelError) as exc:
        raise ModelError(
            f"model.weights {path} do not fit backbone {name!r} with {num_classes} classes: {exc}"
        ) from exc
    bake_masks(model)
    return model
