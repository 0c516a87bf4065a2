"""A kept copy of model tensors (PruSC's best states) that is not held twice, in memory or in a checkpoint.

While the kept candidate IS the model's current state, a keeper holds :data:`IN_MODEL` instead of a copy
and copies the tensors only when the model is about to change (:func:`materialised`). In the state a
checkpoint stores, every kept tensor that is bit for bit the model's own (which the checkpoint's
``state_dict`` holds) is :data:`IN_MODEL` too (:func:`for_checkpoint`). A resumed run reads those back from
the model as loaded (:func:`materialised` again): Lightning loads the model's weights before the callbacks'
state, and the model is as saved until its first training step. A checkpoint stores a kept tensor whose
elements are all the same (the dense model's mask logits, all ``init_logit``) as that one value and its shape
(:func:`compact`); loaded, it is a view of that value (:func:`from_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

IN_MODEL = "in the model"  # the marker: this tensor (or the whole copy) is the model's current one

Kept = dict[str, Any] | str | None  # a copy by name (tensors, constants or markers), the marker, or nothing


def is_marker(value: Any) -> bool:
    """Whether ``value`` is :data:`IN_MODEL` (and not a tensor, a dict or ``None``)."""
    return isinstance(value, str) and value == IN_MODEL


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same values bit for bit (dtype, shape, values and the sign of zeros)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    b = b.detach().to(a.device)
    if not torch.equal(a, b):  # NaN never equals itself: such a tensor is stored
        return False
    return not a.is_floating_point() or torch.equal(torch.signbit(a), torch.signbit(b))


def compact(tensor: Tensor) -> Tensor | dict[str, Any]:
    """``tensor``, or ``{"fill": value, "shape": [...]}`` where every element is that one value."""
    if tensor.numel() > 1:
        fill = tensor.detach().flatten()[0].clone()
        if same_bits(tensor, fill.expand(tensor.shape)):
            return {"fill": fill, "shape": list(tensor.shape)}
    return tensor


def materialised(kept: Kept, live: Callable[[], Mapping[str, Tensor]]) -> Kept:
    """``kept`` with every marker replaced by a CPU copy of the model's tensor of that name (``live()``, asked for
    only where there is a marker: this runs before every training step)."""
    if is_marker(kept):
        return {k: v.detach().to("cpu", copy=True) for k, v in live().items()}
    if not isinstance(kept, dict) or not any(is_marker(v) for v in kept.values()):
        return kept
    tensors = live()
    return {k: tensors[k].detach().to("cpu", copy=True) if is_marker(v) else v for k, v in kept.items()}


def for_checkpoint(kept: Kept, live: Mapping[str, Tensor]) -> Kept:
    """``kept`` as a checkpoint stores it: each tensor that is bit for bit the model's (``live``) a marker, each
    other one :func:`compact`."""
    if not isinstance(kept, dict):
        return kept
    return {k: IN_MODEL if k in live and same_bits(v, live[k]) else compact(v) for k, v in kept.items()}


def from_checkpoint(kept: Kept) -> Kept:
    """``kept`` as :func:`for_checkpoint` stored it, with each constant a tensor again (a view of its one value)."""
    if not isinstance(kept, dict):
        return kept
    return {k: v["fill"].expand(v["shape"]) if isinstance(v, dict) else v for k, v in kept.items()}
