"""Forward hooks that keep a tensor of one pass: a module's input (the head's: the embedding) or output."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class InputCapture:
    """Forward pre-hook that keeps the first input of a module (the head: the penultimate embedding)."""

    def __init__(self, module: nn.Module) -> None:
        self.value: Tensor | None = None
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.value = args[0]

    def remove(self) -> None:
        self.handle.remove()


class OutputCapture:
    """Forward hook that keeps the output of a module (a layer's activation)."""

    def __init__(self, module: nn.Module) -> None:
        self.value: Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        self.value = output

    def remove(self) -> None:
        self.handle.remove()
