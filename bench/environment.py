"""Where the figures were measured (machine, GPU, versions) and the precision a run asks for."""

from __future__ import annotations

import platform
from datetime import date


def environment() -> dict[str, str]:
    """The date, machine, GPU and package versions a results file records."""
    import lightning
    import timm
    import torch
    import zennit

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "gpu": cuda,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
        "zennit": getattr(zennit, "__version__", "0.5.1"),
    }


def resolve_precision(value: str) -> str:
    """``auto``: bf16-mixed where a CUDA GPU supports it (LRP and Grad-CAM still run in float32), else 32-true."""
    if value != "auto":
        return value
    import torch

    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
