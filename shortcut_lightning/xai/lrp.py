"""Batch LRP relevance (zennit) for a target class: at the input, and per channel at named layers.

:func:`relevance` is the one entry point: it puts the model in eval mode, applies a composite (rules +
the canonizers of :mod:`shortcut_lightning.xai.canonizers`), runs one forward and one modified backward,
and restores the model afterwards, even on error: parameters (the same ``Parameter`` objects and values),
buffers, hooks, forward methods, children and every module's train/eval flag.

Conventions:

* The relevance starts as ``one_hot(target) * logit``: the total relevance of a sample is its target
  logit, and positive relevance is evidence FOR the class. LRP rules conserve this total layer by layer
  (exactly when biases are left out of the rules, ``zero_params="bias"``; otherwise biases absorb a part).
* Relevance at a layer is the relevance at the layer's OUTPUT, per channel (summed over positions):
  ``[N, C]`` for a conv stage ``[N, C, H, W]``, a ViT block's tokens ``[N, T, C]`` or a flat layer; or
  per position (summed over channels, ``per="position"``): ``[N, H, W]`` or ``[N, T]``.
* Nothing is silently wrong: an operation combining two activations outside a canonized block (a residual
  add zennit does not know, a gate, attention), a module with parameters but no rule (LayerNorm, ...),
  or canonizers that change the model's output raise :class:`~shortcut_lightning.errors.ModelError`.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from timm.layers import LayerScale
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat
from zennit.core import Composite
from zennit.layer import Sum
from zennit.types import Activation, AvgPool, BatchNorm, Convolution, Linear

from shortcut_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from shortcut_lightning.errors import ModelError, ShortcutError
from shortcut_lightning.probing.activations import reduce_channels, reduce_positions
from shortcut_lightning.probing.model_parts import find_module
from shortcut_lightning.xai.canonizers import SUPPORTED_BLOCKS, canonizers_for
from shortcut_lightning.xai.efficientnet_canonizers import DepthwiseConvolution
from shortcut_lightning.xai.precision import float32_attribution
from shortcut_lightning.xai.rules import (
    EpsilonDirect,
    FlatDirect,
    GammaNonNegative,
    LayerNormEpsilon,
    NormDirect,
    PassThrough,
    WSquareDirect,
    ZBoxDirect,
    ZPlusNonNegative,
)

COMPOSITES: dict[str, type[Composite]] = {
    "epsilon_plus_flat": EpsilonPlusFlat,
    "epsilon_gamma_box": EpsilonGammaBox,
}


class LRPResult(NamedTuple):
    """Relevance of one batch: ``input`` [N, *image], ``layers`` {name: [N, C]}, the model's ``logits`` [N, K]."""

    input: Tensor
    layers: dict[str, Tensor]
    logits: Tensor


def make_composite(
    name: str,
    model: nn.Module,
    *,
    zero_params: str | Sequence[str] | None = None,
    epsilon: float = 1e-6,
    gamma: float = 0.25,
    low: Tensor | float | None = None,
    high: Tensor | float | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Composite:
    """A fresh zennit composite ``name`` (a key of :data:`COMPOSITES`) with the canonizers ``model`` needs.

    ``zero_params="bias"`` leaves biases out of the rules (exact conservation). ``epsilon_gamma_box``
    needs the input's bounds for its first layer: ``low``/``high``, by default those of [0, 1] images
    normalised with ``mean``/``std`` (ImageNet's, as our transforms do).
    """
    if name not in COMPOSITES:
        close = difflib.get_close_matches(name, list(COMPOSITES), n=1, cutoff=0.3)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ShortcutError(f"unknown LRP composite {name!r}{hint}; choose one of {', '.join(COMPOSITES)}")
    # BatchNorms are merged into the conv before them and then compute the identity; some zennit versions
    # give them Pass in their base layer map, others no rule: state it so every version does the same.
    # PassThrough and the conv rules are zennit's, minus work whose result is thrown away (xai/rules.py)
    layer_map: list[tuple[Any, Any]] = [
        (BatchNorm, PassThrough()),
        (Activation, PassThrough()),
        (Sum, NormDirect(stabilizer=epsilon)),
        (DepthwiseConvolution, WSquareDirect(zero_params=zero_params)),
        (AvgPool, NormDirect(stabilizer=epsilon)),
        (nn.Linear, EpsilonDirect(epsilon=epsilon, zero_params=zero_params)),
        (nn.LayerNorm, LayerNormEpsilon(epsilon=epsilon, zero_params=zero_params)),
        (LayerScale, PassThrough()),
    ]
    kwargs: dict[str, Any] = {"layer_map": layer_map, "canonizers": canonizers_for(model, epsilon)}
    if COMPOSITES[name] is EpsilonGammaBox and any(
        isinstance(m, DepthwiseConvolution) for m in model.modules()
    ):
        raise ModelError(
            "LRP composite 'epsilon_gamma_box' does not conserve relevance on depthwise-separable networks "
            "(EfficientNet): the gamma rule on their signed linear-bottleneck inputs divides by near-zero sums "
            "(measured: a relevance total off by 1e15). Use composite='epsilon_plus_flat'"
        )
    if COMPOSITES[name] is EpsilonGammaBox:
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        low = -m / s if low is None else low
        high = (1 - m) / s if high is None else high
        kwargs.update(gamma=gamma, low=low, high=high)
        layer_map.append((Convolution, GammaNonNegative(gamma=gamma, zero_params=zero_params)))
        kwargs["first_map"] = [(Convolution, ZBoxDirect(low=low, high=high, zero_params=zero_params))]
    elif COMPOSITES[name] is EpsilonPlusFlat:
        layer_map.append((Convolution, ZPlusNonNegative(zero_params=zero_params)))
        kwargs["first_map"] = [(Linear, FlatDirect(zero_params=zero_params))]
    kwargs.update(epsilon=epsilon, zero_params=zero_params)
    return COMPOSITES[name](**kwargs)


def relevance(
    model: nn.Module,
    images: Tensor,
    target: int | Tensor,
    composite: str | Composite = "epsilon_plus_flat",
    layers: Sequence[str] = (),
    per: str = "channel",
) -> LRPResult:
    """LRP relevance of class ``target`` (an int, or one class per sample [N]) for a batch of ``images``.

    ``composite`` is a name of :data:`COMPOSITES` (built with :func:`make_composite`) or a ready zennit
    ``Composite`` (one not registered elsewhere; it must bring its own canonizers). ``layers`` are dotted
    module names of ``model`` (e.g. ``"net.layer4"`` for a ShortcutClassifier); an unknown name raises
    ModelError listing the nearest ones; ``per`` is ``"channel"`` or ``"position"`` (module docstring).
    Returns detached tensors on the model's device.
    """
    if per not in ("channel", "position"):
        raise ShortcutError(f"per must be 'channel' or 'position', got {per!r}")
    layers = [layers] if isinstance(layers, str) else list(layers)
    modules = {name: find_module(model, name, "LRP layer") for name in layers}
    param = next(model.parameters(), None)
    images = images.to(param.device) if param is not None else images
    if isinstance(composite, str):
        composite = make_composite(composite, model)
    state = _ModelState(model)
    captures: dict[str, _Capture] = {}
    try:
        model.eval()
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            float32_attribution(model, images.device.type, "LRP"),
        ):
            x = images.detach().float().clone().requires_grad_(True)
            with torch.no_grad():
                reference = model(x[:1])
            guard = _Guard(model)
            composite.register(model)
            guard.watch_unruled_modules()
            captures = {name: _Capture(name, module) for name, module in modules.items()}
            with guard:
                logits = model(x)
            _check_logits(logits, reference, len(x))
            for capture in captures.values():
                if capture.value is None:
                    raise ModelError(f"LRP layer {capture.name!r} does not run in the model's forward")
            start = _one_hot(target, logits) * logits.detach()
            grads = torch.autograd.grad(
                logits, [x, *(c.value for c in captures.values())], grad_outputs=start, allow_unused=True
            )
        per_layer = {}
        for name, grad in zip(captures, grads[1:], strict=True):
            if grad is None:
                raise ModelError(
                    f"LRP layer {name!r} does not lead to the model's output; pick a layer on its path"
                )
            per_layer[name] = reduce_channels(grad, "sum") if per == "channel" else reduce_positions(grad)
        return LRPResult(grads[0].detach(), {k: v.detach() for k, v in per_layer.items()}, logits.detach())
    finally:
        for capture in captures.values():
            capture.remove()
        composite.remove()
        state.restore()


def _one_hot(target: int | Tensor, logits: Tensor) -> Tensor:
    n, k = logits.shape
    t = torch.as_tensor(target, device=logits.device)
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8) or t.ndim > 1:
        raise ShortcutError(f"LRP target must be an int or an integer tensor [N] of classes, got {target!r}")
    t = t.long().expand(n) if t.ndim == 0 else t.long()
    if len(t) != n or (t < 0).any() or (t >= k).any():
        raise ShortcutError(f"LRP target {target!r} does not fit {n} samples with {k} classes")
    return torch.zeros_like(logits).scatter_(1, t[:, None], 1.0)


def _check_logits(logits: Any, reference: Tensor, n: int) -> None:
    if not isinstance(logits, Tensor) or logits.ndim != 2 or len(logits) != n:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ModelError(f"LRP needs a model returning logits [N, classes], got {got}")
    err = (logits[:1].detach() - reference).abs().max() / reference.abs().max().clamp_min(1e-12)
    if err > 1e-2:
        raise ModelError(
            f"the LRP canonizers changed the model's output (relative error {err:.2g}): a BatchNorm was merged "
            "into a layer that does not feed it. Modules must be registered in the order they run"
        )


class _Capture:
    """Forward hook keeping a layer's output (a clone, so later in-place ops cannot rebase it)."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name, self.value, self.calls = name, None, 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Tensor:
        self.calls += 1
        if self.calls > 1:
            raise ModelError(
                f"LRP layer {self.name!r} runs more than once per forward; pick a module that runs once"
            )
        if not isinstance(output, Tensor) or output.ndim < 2:
            raise ModelError(
                f"LRP layer {self.name!r} must output a tensor [N, C, ...], got {type(output).__name__}"
            )
        self.value = output.clone()
        return self.value

    def remove(self) -> None:
        self.handle.remove()


# ops that combine two tensors elementwise or by products: with two activations, no LRP rule covers them
_ARITHMETIC = ("add", "sub", "mul", "div", "truediv")
# forms of each: add, add_, __add__, __radd__, __iadd__
_FORMS = ("", ""), ("", "_"), ("__", "__"), ("__r", "__"), ("__i", "__")
_COMBINING = frozenset(
    {f"{pre}{op}{post}" for op in _ARITHMETIC for pre, post in _FORMS}
    | {"rsub", "true_divide", "matmul", "__matmul__", "mm", "bmm", "einsum", "baddbmm", "addcmul"}
)


def _activations(args: Sequence[Any], kwargs: dict[str, Any]) -> int:
    """How many arguments are tensors computed from the input (parameters do not count)."""
    flat = [b for a in (*args, *kwargs.values()) for b in (a if isinstance(a, (list, tuple)) else [a])]
    return sum(isinstance(a, Tensor) and a.requires_grad and not isinstance(a, nn.Parameter) for a in flat)


class _Guard(TorchFunctionMode):
    """Refuses what no rule covers: two activations combined by an op, or a parametrised module without a rule."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.names = {id(m): n for n, m in model.named_modules()}
        self.hooks: dict[int, int] = {id(m): len(m._forward_pre_hooks) for m in model.modules()}

    def watch_unruled_modules(self) -> None:
        """After the composite is registered: a parametrised leaf that got no rule must not run."""
        for name, module in self.model.named_modules():
            bare = len(module._forward_pre_hooks) == self.hooks.get(id(module), 0)
            leaf = next(module.children(), None) is None
            if bare and leaf and any(True for _ in module.parameters(False)) and not _is_identity(module):
                module.register_forward_pre_hook(self._unruled(name))  # removed by _ModelState.restore

    @staticmethod
    def _unruled(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            raise ModelError(
                f"{type(module).__name__} {name!r} has parameters but no LRP rule in this composite, so its "
                "relevance would be a plain gradient; LRP here supports conv/linear/BatchNorm/pooling networks and timm ViTs"
            )

        return hook

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _COMBINING and _activations(args, kwargs) > 1:
            raise ModelError(self._combining_message(func.__name__))
        return func(*args, **kwargs)

    def _combining_message(self, op: str) -> str:
        frame, block = sys._getframe(2), self.model
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, nn.Module) and id(candidate) in self.names:
                block = candidate
                break
            frame = frame.f_back
        kind = f"{type(block).__module__}.{type(block).__qualname__}"
        return (
            f"{kind} {self.names[id(block)] or '(the model)'!r} combines two activations with "
            f"`{op}` (a residual add, a gate or attention) that no LRP rule covers: relevance would be silently "
            f"wrong (doubled at each residual add). Residual blocks with a canonizer: {', '.join(SUPPORTED_BLOCKS)}; "
            f"for {type(block).__name__} add one to shortcut_lightning/xai/canonizers.py"
        )


def _is_identity(module: nn.Module) -> bool:
    """A BatchNorm merged into the layer before it (a plain gradient through it is exact)."""
    if not isinstance(module, BatchNorm) or module.running_mean is None or module.weight is None:
        return False
    pairs = ((module.running_mean, 0), (module.running_var, 1), (module.weight, 1), (module.bias, 0))
    return all(bool((t == v).all()) for t, v in pairs)


_MISSING = object()


class _ModelState:
    """A snapshot of what canonizers, rules and hooks touch on every module, to put back exactly.

    Attributes and the contents of every dict attribute (parameters, buffers, children, hook tables) are
    restored by identity; parameter and buffer values by their storage. This also undoes what zennit
    leaves behind: after a zennit 1.0 rule (``load_state_dict(assign=True)``) a module holds NEW
    ``Parameter`` objects, so an optimizer would update the old ones, which still hold BatchNorm-merged
    values; and a canonizer that fails half-way through ``Composite.register`` is never removed.
    """

    def __init__(self, model: nn.Module) -> None:
        self.saved = []
        for module in model.modules():
            attrs = dict(module.__dict__)
            contents = {k: dict(v) for k, v in attrs.items() if isinstance(v, dict)}
            tensors = [
                (t, t.data)
                for t in (*module._parameters.values(), *module._buffers.values())
                if t is not None
            ]
            self.saved.append((module, attrs, contents, tensors))

    def restore(self) -> None:
        for module, attrs, contents, tensors in self.saved:
            current = module.__dict__
            for key in [k for k in current if k not in attrs]:
                del current[key]
            for key, value in attrs.items():
                if current.get(key, _MISSING) is not value:
                    current[key] = value
            for key, content in contents.items():
                table = attrs[key]
                if len(table) != len(content) or any(
                    table.get(k, _MISSING) is not v for k, v in content.items()
                ):
                    table.clear()
                    table.update(content)
            for tensor, data in tensors:
                if (
                    tensor.data_ptr() != data.data_ptr()
                    or tensor.shape != data.shape
                    or tensor.dtype != data.dtype
                ):
                    tensor.data = data
