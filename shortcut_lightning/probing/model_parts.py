"""Finding the parts of any model a stage needs (a named layer, the classification head) and probing it unchanged."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from contextlib import contextmanager

from timm.models import vision_transformer as timm_vit
from torch import nn

from shortcut_lightning.errors import ModelError, ShortcutError


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for a probe or an analysis pass, its train/eval mode restored afterwards.

    A forward in train mode, even under ``no_grad``, updates every BatchNorm's running statistics: a
    probe of two images in the middle of ``fit`` would silently change the model being trained.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:  # the flag itself: train() would recurse into every subtree again
            module.training = training


def find_module(model: nn.Module, path: str, argument: str = "layer") -> nn.Module:
    """``model.<path>`` by dotted name; an unknown name lists the nearest valid ones."""
    modules = dict(model.named_modules())
    if path in modules:
        return modules[path]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.5) or names[:5]
    raise ModelError(
        f"{argument} {path!r} is not a module of {type(model).__name__}; nearest names: {', '.join(close)}"
    )


def find_head(model: nn.Module, path: str | None = None, argument: str = "head") -> nn.Linear:
    """The final linear classifier: ``path`` if given, else timm's ``get_classifier()``, else the last ``nn.Linear``.

    The model may be a LightningModule wrapping the network: its ``head`` attribute or a child's
    ``get_classifier()`` are found too.
    """
    if path is not None:
        head = find_module(model, path, argument)
    else:
        head = _timm_classifier(model)
        if head is None:
            linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
            head = linears[-1] if linears else None
    if not isinstance(head, nn.Linear):
        found = "nothing" if head is None else type(head).__name__
        raise ModelError(
            f"cannot find the classification head of {type(model).__name__} (found {found}, need an nn.Linear): "
            f"name it with the callback's `{argument}` argument, e.g. {argument}='net.fc'"
        )
    return head


def transformer_blocks(model: nn.Module) -> list[str]:
    """Dotted names of the timm ViT blocks of ``model``, in order."""
    return [name for name, module in model.named_modules() if type(module) is timm_vit.Block]


def last_transformer_block(model: nn.Module) -> str | None:
    """Dotted name of the last timm ViT block, or None.

    It is the Grad-CAM layer for ViTs of "An XAI-based Analysis of Shortcut Learning in Neural Networks"
    (Le et al.).
    """
    names = transformer_blocks(model)
    return names[-1] if names else None


def first_transformer_block(model: nn.Module) -> str | None:
    """Dotted name of the first timm ViT block, or None."""
    names = transformer_blocks(model)
    return names[0] if names else None


def _timm_classifier(model: nn.Module) -> nn.Module | None:
    for module in (model, *model.children()):
        get = getattr(module, "get_classifier", None)
        if callable(get):
            return get()
    return None


def freeze_before(model: nn.Module, name: str, argument: str = "finetune_from") -> int:
    """Freezes (``requires_grad=False``) every parameter registered before module ``name``; returns how many."""
    module = find_module(model, name, argument)
    first = next(module.parameters(), None)
    if first is None:
        raise ShortcutError(f"{argument}={name!r} names a module without parameters")
    frozen = 0
    for param in model.parameters():
        if param is first:
            return frozen
        param.requires_grad_(False)
        frozen += 1
    return frozen


def modules_before(model: nn.Module, name: str, argument: str = "finetune_from") -> list[nn.Module]:
    """The leaf modules registered before module ``name`` (the part :func:`freeze_before` freezes)."""
    target = find_module(model, name, argument)
    before = []
    for module in model.modules():
        if module is target:
            return before
        if next(module.children(), None) is None:
            before.append(module)
    return before
