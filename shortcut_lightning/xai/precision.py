"""Attribution runs in float32, also when called inside a mixed-precision (``bf16-mixed``/``16-mixed``) step.

LRP's stabilised divisions and Grad-CAM's gradients lose too much in bfloat16, so autocast is switched off
for the attribution's own forward and backward. Under ``*-mixed`` precision the weights stay float32 and
this is all it takes; a model whose weights are half (``*-true`` precision) is refused with the fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from shortcut_lightning.errors import ModelError


@contextmanager
def float32_attribution(model: nn.Module, device_type: str, what: str) -> Iterator[None]:
    """Autocast off for ``device_type`` while the block runs; refuses non-float32 weights (``what`` names the caller)."""
    half = sorted(
        {str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32}
    )
    if half:
        raise ModelError(
            f"{what} runs in float32 but the model's weights are {', '.join(half)} (a '*-true' precision); "
            "train with --trainer.precision bf16-mixed or 16-mixed instead (the weights stay float32), "
            "or call model.float() before the attribution"
        )
    with torch.autocast(device_type, enabled=False):
        yield
