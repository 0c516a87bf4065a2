"""LRP through timm vision transformers (AttnLRP with CP-LRP's attention), and attention maps per head.

:class:`ViTCanonizer` rewrites, for the duration of one attribution, the ``forward`` of timm's
``vision_transformer.Block`` and ``Attention`` (and the token pooling of ``VisionTransformer``):

* residual adds get zennit's ``Norm`` rule (:class:`~shortcut_lightning.xai.rules.ResidualAdd`): the relevance is split between
  the branch and the shortcut in proportion to their contributions (a plain ``+`` would double it);
* the attention probabilities are computed without gradient: no relevance flows through the
  query-key product (CP-LRP; AttnLRP's softmax rule differs only there), and ``attn @ v`` is linear in
  the values, attributed with the epsilon rule (:class:`_AttentionValues`);
* average pooling over tokens gets the epsilon rule too (:class:`_TokenMean`); the class-token pool
  is an index and needs no rule.

The composite (:func:`~shortcut_lightning.xai.lrp.make_composite`) adds the rules of the remaining
layers: epsilon on every ``Linear`` (qkv, proj, fc1, fc2, head), AttnLRP's identity-on-normalisation
rule on ``LayerNorm`` (:class:`~shortcut_lightning.xai.rules.LayerNormEpsilon`), identity on GELU and
LayerScale. Relevance is conserved through the blocks; the class token and the position embedding are
parameters, so the relevance that reaches them is not passed on to the pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from timm.models import vision_transformer as timm_vit
from torch import Tensor, nn
from zennit.canonizers import AttributeCanonizer

from shortcut_lightning.errors import ModelError
from shortcut_lightning.xai.rules import ResidualAdd, stabilize

_BLOCK_PARTS = {"norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"}
_ATTENTION_PARTS = {"qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"}
VIT_CLASSES = (timm_vit.VisionTransformer, timm_vit.Block, timm_vit.Attention)


class _AttentionValues(torch.autograd.Function):
    """``attn @ v`` for constant attention probabilities, with the epsilon rule as its backward."""

    @staticmethod
    def forward(ctx: Any, attn: Tensor, values: Tensor, epsilon: float) -> Tensor:
        out = attn @ values
        ctx.save_for_backward(attn, values, out)
        ctx.epsilon = epsilon
        return out

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[None, Tensor, None]:
        attn, values, out = ctx.saved_tensors
        ratio = relevance / stabilize(out, ctx.epsilon)
        return None, values * (attn.transpose(-2, -1) @ ratio), None


class _TokenMean(torch.autograd.Function):
    """Mean over tokens ``[N, T, C] -> [N, C]`` with the epsilon rule as its backward."""

    @staticmethod
    def forward(ctx: Any, tokens: Tensor, epsilon: float) -> Tensor:
        out = tokens.mean(1)
        ctx.save_for_backward(tokens, out)
        ctx.epsilon = epsilon
        return out

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor, None]:
        tokens, out = ctx.saved_tensors
        ratio = relevance / stabilize(out, ctx.epsilon)
        return tokens * ratio.unsqueeze(1) / tokens.shape[1], None


def _block_forward(epsilon: float) -> Callable[..., Tensor]:
    def forward(self: Any, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ModelError("LRP of a ViT block with an attention mask is not supported")
        x = ResidualAdd.apply(x, self.drop_path1(self.ls1(self.attn(self.norm1(x)))), epsilon)
        return ResidualAdd.apply(x, self.drop_path2(self.ls2(self.mlp(self.norm2(x)))), epsilon)

    return forward


def attention_probabilities(attention: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(probabilities [N, heads, T, T] without gradient, values [N, heads, T, d]) of a timm ``Attention`` on ``x``."""
    n, t, _ = x.shape
    qkv = attention.qkv(x).reshape(n, t, 3, attention.num_heads, attention.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    with torch.no_grad():
        q, k = attention.q_norm(q.detach()), attention.k_norm(k.detach())
        probabilities = ((q * attention.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return probabilities, v


def _attention_forward(epsilon: float) -> Callable[..., Tensor]:
    def forward(self: Any, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ModelError("LRP of ViT attention with an attention mask is not supported")
        probabilities, values = attention_probabilities(self, x)
        out = _AttentionValues.apply(probabilities, values, epsilon)
        out = self.norm(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.attn_dim))
        return self.proj_drop(self.proj(out))

    return forward


def _pool(epsilon: float) -> Callable[..., Tensor]:
    def pool(self: Any, x: Tensor, pool_type: str | None = None) -> Tensor:
        kind = self.global_pool if pool_type is None else pool_type
        if kind == "token":
            return x[:, 0]
        if kind == "avg":
            tokens = x if getattr(self, "pool_include_prefix", False) else x[:, self.num_prefix_tokens :]
            return _TokenMean.apply(tokens, epsilon)
        if not kind:
            return x
        raise ModelError(f"LRP supports ViT global_pool 'token' and 'avg', not {kind!r}")

    return pool


def check_vit_module(name: str, module: nn.Module) -> None:
    """Refuse a timm ViT part the rewritten forward would skip or mishandle."""
    where = f"{type(module).__qualname__} {name!r}"
    if type(module) is timm_vit.Attention and getattr(module, "gate", None) is not None:
        raise ModelError(f"{where} has a gate (a product of activations) that LRP has no rule for")
    if type(module) is timm_vit.VisionTransformer and getattr(module, "attn_pool", None) is not None:
        raise ModelError(f"{where} pools with attention ('map'); LRP supports global_pool 'token' and 'avg'")
    known = {timm_vit.Block: _BLOCK_PARTS, timm_vit.Attention: _ATTENTION_PARTS}.get(type(module))
    unknown = sorted(set(dict(module.named_children())) - known) if known else []
    if unknown:
        raise ModelError(
            f"{where} has parts {unknown} that the ViT LRP canonizer does not know: relevance would be "
            "wrong. Extend shortcut_lightning/xai/attention.py for this block"
        )


class ViTCanonizer(AttributeCanonizer):
    """Rewrites timm ViT blocks, attention and token pooling for LRP (see the module docstring); removal restores them."""

    def __init__(self, epsilon: float = 1e-6) -> None:
        block, attention, pool = _block_forward(epsilon), _attention_forward(epsilon), _pool(epsilon)

        def attributes(name: str, module: nn.Module) -> dict[str, Any] | None:
            if type(module) not in VIT_CLASSES:
                return None
            check_vit_module(name, module)
            if type(module) is timm_vit.Block:
                return {"forward": block.__get__(module)}
            if type(module) is timm_vit.Attention:
                return {"forward": attention.__get__(module)}
            return {"pool": pool.__get__(module)}

        super().__init__(attributes)


def has_vit_modules(model: nn.Module) -> bool:
    """Whether ``model`` holds timm ViT blocks (so LRP needs :class:`ViTCanonizer`)."""
    return any(type(m) in VIT_CLASSES for m in model.modules())
