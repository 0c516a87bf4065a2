"""Attribution runs in float32, also when called inside a mixed-precision (``bf16-mixed``/``16-mixed``) step.

LRP's stabilised divisions and Grad-CAM's gradients lose too much in bfloat16, so autocast is switched off
for the attribution's own forward and backward. Under ``*-mixed`` precision the weights stay float32 and
this is all it takes; a model whose weights are half (``*-true`` precision) is refused with the fix.
TF32 is switched off too: CUDA runs float32 convolutions in TF32 by default, whose 10-bit mantissa moved
EfficientNet-Lite's logits by 12% of their size through LRP's merged BatchNorms (an H200, 224 px).
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
    with torch.autocast(device_type, enabled=False), ieee_float32():
        yield


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Full float32 (no TF32) for CUDA convolutions and matrix products while the block runs; always restored."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
