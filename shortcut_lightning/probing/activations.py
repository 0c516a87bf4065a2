"""Activation layouts: CNN maps ``[N, C, H, W]`` and ViT tokens ``[N, T, C]``, reduced or shown the same way.

A 3-dim activation is read as timm's token layout (tokens, then channels), a 4-dim one as channels
first. Stages that score "neurons" (channels) or draw maps over the image go through these functions,
so the same code serves ResNets and vision transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from shortcut_lightning.errors import ModelError


def reduce_channels(activation: Tensor, op: str = "mean") -> Tensor:
    """Per-channel ``mean`` or ``sum`` over positions ``[N, C]``: pixels of a map, tokens of a ViT."""
    if activation.ndim == 2:
        return activation
    if activation.ndim == 3:
        return activation.mean(1) if op == "mean" else activation.sum(1)
    flat = activation.flatten(2)
    return flat.mean(2) if op == "mean" else flat.sum(2)


def reduce_positions(activation: Tensor) -> Tensor:
    """Sum over channels, per position: ``[N, H, W]`` for maps, ``[N, T]`` for tokens."""
    if activation.ndim == 3:
        return activation.sum(2)
    return activation.sum(1)


@dataclass(frozen=True)
class TokenLayout:
    """How a ViT lays out its tokens: ``prefix`` class/register tokens, then a ``grid`` (rows, cols) of patches."""

    prefix: int
    grid: tuple[int, int]

    def to_grid(self, tokens: Tensor) -> Tensor:
        """Tokens ``[N, T, C]`` (or ``[N, T]``) to patch maps ``[N, C, rows, cols]`` (or ``[N, rows, cols]``)."""
        rows, cols = self.grid
        patches = tokens[:, self.prefix :]
        if patches.shape[1] != rows * cols:
            raise ModelError(
                f"{tokens.shape[1]} tokens do not fit {self.prefix} prefix tokens and a {rows}x{cols} patch grid"
            )
        if tokens.ndim == 2:
            return patches.reshape(len(tokens), rows, cols)
        return patches.transpose(1, 2).reshape(len(tokens), -1, rows, cols)

    def position(self, row: int, col: int) -> int:
        """Token index of the patch at (``row``, ``col``)."""
        rows, cols = self.grid
        if not (0 <= row < rows and 0 <= col < cols):
            raise ModelError(f"patch ({row}, {col}) is outside the {rows}x{cols} patch grid")
        return self.prefix + row * cols + col


def token_layout(model: nn.Module) -> TokenLayout | None:
    """The token layout of the first timm ViT-like module in ``model`` (one with ``patch_embed.grid_size``)."""
    for module in model.modules():
        embed = getattr(module, "patch_embed", None)
        grid = getattr(embed, "grid_size", None)
        if grid is not None and hasattr(module, "num_prefix_tokens"):
            return TokenLayout(int(module.num_prefix_tokens), (int(grid[0]), int(grid[1])))
    return None


def require_token_layout(model: nn.Module, what: str) -> TokenLayout:
    """:func:`token_layout`, or a ModelError saying ``what`` needs a timm ViT."""
    layout = token_layout(model)
    if layout is None:
        raise ModelError(
            f"{what} reads token activations [N, T, C] as a patch grid, which needs a timm vision transformer "
            f"(a module with patch_embed.grid_size and num_prefix_tokens); {type(model).__name__} has none"
        )
    return layout
