"""Forward hooks that keep a tensor of one pass: a module's input (the head's: the embedding) or output.

Each capture is a context manager that always removes its hook (zennit's style)::

    with OutputCapture(model.layer4) as activation, InputCapture(model.fc) as embedding:
        model(images)
    activation.value, embedding.value
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class _Capture:
    """A hook that keeps one tensor in ``value``; ``remove()`` or leaving the ``with`` block removes it."""

    handle: RemovableHandle

    def __init__(self) -> None:
        self.value: Tensor | None = None

    def remove(self) -> None:
        self.handle.remove()

    def __enter__(self) -> _Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class InputCapture(_Capture):
    """Forward pre-hook that keeps the first input of a module (the head: the penultimate embedding)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.value = args[0]

    def __enter__(self) -> InputCapture:
        return self


class OutputCapture(_Capture):
    """Forward hook that keeps the output of a module (a layer's activation)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        self.value = output

    def __enter__(self) -> OutputCapture:
        return self


@contextmanager
def capturing_outputs(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, OutputCapture]]:
    """One :class:`OutputCapture` per named module, all removed on leaving the block."""
    with ExitStack() as stack:
        yield {name: stack.enter_context(OutputCapture(m)) for name, m in modules.items()}


def layer_and_embedding(
    model: nn.Module, layer: nn.Module, head: nn.Module, images: Tensor
) -> tuple[Tensor, Tensor]:
    """(``layer``'s output, the embedding [N, d] the ``head`` reads) of one forward pass of ``model``.

    The caller chooses the mode: wrap it in ``torch.no_grad()`` and ``evaluating(model)`` for a probe.
    """
    with OutputCapture(layer) as activation, InputCapture(head) as embedding:
        model(images)
    if activation.value is None or embedding.value is None:
        raise RuntimeError("the forward pass did not run through the chosen layer and the head")
    return activation.value, embedding.value.flatten(1)
