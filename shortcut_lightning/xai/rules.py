"""zennit's rules, computing the same relevance without the work whose result is thrown away.

* zennit keeps each hooked layer's autograd graph and overwrites the gradient at its input, so autograd
  still runs the layer's plain backward (conv, BatchNorm, ReLU) and discards it. Our rules detach the
  layer's output and put the rule itself in the backward node (:class:`_RuleFunction`).
* zennit's ZPlus splits a layer's input into its positive and negative parts and pairs each with the
  weights of one sign; Gamma does so twice. Behind a ReLU (every conv of a ResNet but the first) the
  negative part is zero: its pairs add nothing to the denominators (their biases are zeroed by the rule)
  or to the relevance, yet each costs a forward and a backward. Our rules skip them when the input has
  no negative entry, and run the whole rule otherwise.
* On signed inputs (EfficientNet's expansion convolutions read the residual stream) both ZPlus pairs
  are one convolution of the stacked input parts; WSquare and Flat read only ones, so their
  denominator comes from one image, not the whole batch.

``tests/test_lrp.py`` checks the relevance equals zennit's own rules'; ``bench/speed.py --only lrp``
measures the gain (LRP/forward throughput on resnet18 went from 0.15 to 0.30; ``--only lrp_efficientnet``
on efficientnet_lite0 at 128 px, one thread, from 0.21 to 0.28-0.34 with these and the BatchNormAct merge).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from zennit.core import Hook, ParamMod
from zennit.layer import Sum
from zennit.rules import Epsilon, Flat, Gamma, Norm, Pass, WSquare, ZBox, ZPlus


class _DirectRule:
    """Mixin for a zennit hook: compute the rule in the layer's own backward node.

    zennit keeps the layer's autograd graph and overwrites the gradient at its input, so autograd still
    runs the layer's plain backward (conv, BatchNorm, ReLU) and throws it away. Here the layer's output is
    detached and handed to :class:`_RuleFunction`, whose backward is the rule: one backward per layer
    instead of two. The input is saved by autograd itself, so an in-place change to it after the forward
    raises instead of corrupting the relevance.
    """

    saves_input = True
    saves_output = False  # rules that read the layer's output get it as ``relevance(..., output=)``

    def pre_forward(self, module: nn.Module, input: Any) -> None:
        return None

    def forward(self, module: nn.Module, input: Any, output: Any) -> None:
        return None

    def post_forward(self, module: nn.Module, input: Any, output: Any) -> Any:
        x = input[0] if isinstance(input, tuple) else input
        if not (isinstance(output, Tensor) and isinstance(x, Tensor) and x.requires_grad):
            return None
        if not torch.is_grad_enabled():
            return None
        return _RuleFunction.apply(x, [output.detach()], self, module)

    def relevance(self, module: nn.Module, x: Tensor | None, grad_output: Tensor) -> Tensor:
        """The relevance at the input ``x`` of ``module`` for the relevance ``grad_output`` at its output."""
        raise NotImplementedError


class _RuleFunction(torch.autograd.Function):
    """Identity on a layer's detached output (passed in a list, so it is not an input) with the rule as backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, box: list[Tensor], rule: _DirectRule, module: nn.Module) -> Tensor:
        ctx.save_for_backward(x if rule.saves_input else None)
        # an alias (no reference to this node, so no cycle) and its version: if a later in-place op (an
        # inplace ReLU after the layer) changes the output, the rule recomputes it instead
        ctx.output = box[0].detach() if rule.saves_output else None
        ctx.output_version = box[0]._version
        ctx.rule, ctx.module = rule, module
        return box[0]

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None, None]:
        (x,) = ctx.saved_tensors
        if ctx.rule.saves_output:
            output, ctx.output = ctx.output, None
            output = output if output._version == ctx.output_version else None
            return ctx.rule.relevance(ctx.module, x, grad_output, output=output), None, None, None
        return ctx.rule.relevance(ctx.module, x, grad_output), None, None, None


class _DirectBasicHook(_DirectRule):
    """A zennit ``BasicHook`` rule, computed directly; on inputs >= 0 the pairs in ``negative_pairs`` are skipped.

    Those pairs take ``input.clamp(max=0)`` with a zeroed bias: on a non-negative input they add nothing
    to the denominators or the relevance, yet each costs a forward and a backward of the layer.
    """

    negative_pairs: tuple[int, ...] = ()
    forward_only: tuple[int, ...] = ()  # pairs whose output the mapper reads but whose gradient it ignores

    def relevance(self, module: nn.Module, x: Tensor | None, grad_output: Tensor) -> Tensor:
        assert x is not None
        skip = self.negative_pairs if non_negative(x) else ()
        inputs: list[Tensor] = []
        outputs: list[Tensor | None] = []
        modifiers = zip(self.input_modifiers, self.param_modifiers, self.output_modifiers, strict=True)  # type: ignore[attr-defined]
        for i, (in_mod, param_mod, out_mod) in enumerate(modifiers):
            if i in skip:
                inputs.append(torch.zeros_like(x))
                outputs.append(None)
                continue
            xi = in_mod(x.detach()).requires_grad_(i not in self.forward_only)
            with ParamMod.ensure(param_mod)(module) as modified, torch.enable_grad():
                outputs.append(out_mod(modified.forward(xi)))
            inputs.append(xi)
        like = next(o for o in outputs if o is not None)
        full = [torch.zeros_like(like) if o is None else o for o in outputs]
        grad_outputs = self.gradient_mapper(grad_output, full)  # type: ignore[attr-defined]
        if isinstance(grad_outputs, Tensor):  # single-pair rules map to one tensor
            grad_outputs = [grad_outputs]
        used = [i for i in range(len(inputs)) if i not in skip and i not in self.forward_only]
        grads = torch.autograd.grad(
            [full[i] for i in used], [inputs[i] for i in used], [grad_outputs[i] for i in used]
        )
        gradients = [torch.zeros_like(x) for _ in inputs]
        for i, grad in zip(used, grads, strict=True):
            gradients[i] = grad
        return self.reducer(inputs, gradients)  # type: ignore[attr-defined]


class ZPlusNonNegative(_DirectBasicHook, ZPlus):
    """zennit's ``ZPlus``; on inputs >= 0, one forward and one backward of the layer instead of two and four.

    On such inputs the rule is ``x * W+^T (R / (x W+ + b+ + eps))``: the denominator is >= 0, so zennit's
    signed stabiliser reduces to adding ``stabilizer``.
    """

    negative_pairs = (1,)

    def __init__(self, stabilizer: float = 1e-6, zero_params: Any = None) -> None:
        super().__init__(stabilizer=stabilizer, zero_params=zero_params)
        self.stabilizer = float(stabilizer)

    def copy(self) -> ZPlusNonNegative:
        copy = super().copy()  # zennit copies through BasicHook.__init__, which drops our attribute
        copy.stabilizer = self.stabilizer
        return copy

    def relevance(self, module: nn.Module, x: Tensor | None, grad_output: Tensor) -> Tensor:
        assert x is not None
        if not non_negative(x):
            return self._signed(module, x, grad_output)
        xi = x.detach().requires_grad_(True)
        with ParamMod.ensure(self.param_modifiers[0])(module) as modified, torch.enable_grad():
            z = modified.forward(xi)
        # the layer's backward does not read z, so its buffer takes the ratio: no new wide tensor
        ratio = z.detach().add_(self.stabilizer)
        (grad,) = torch.autograd.grad(z, xi, torch.div(grad_output, ratio, out=ratio))
        return grad.mul_(xi.detach())

    def _signed(self, module: nn.Module, x: Tensor, grad_output: Tensor) -> Tensor:
        """zennit's signed ``ZPlus``: ``x+ W+`` and ``x- W-`` are both >= 0, so their sum needs no sign in
        its stabiliser (zennit's ``sign`` pass is the costliest step on EfficientNet's linear bottlenecks).

        On a plain ungrouped convolution the two pairs are one convolution of ``[x+, x-]`` (channels
        stacked) with ``[W+, W-]``: the same products, but the wide output (EfficientNet's expansion
        convolutions read signed inputs and write 6x the channels) is written and read once, not twice.
        """
        if _plain_conv(module) and module.groups == 1:
            return self._signed_stacked(module, x, grad_output)
        pos = x.detach().clamp(min=0).requires_grad_(True)
        neg = x.detach().clamp(max=0).requires_grad_(True)
        with ParamMod.ensure(self.param_modifiers[0])(module) as modified, torch.enable_grad():
            z_pos = modified.forward(pos)
        with ParamMod.ensure(self.param_modifiers[1])(module) as modified, torch.enable_grad():
            z_neg = modified.forward(neg)
        ratio = z_pos.detach().add(z_neg.detach()).add_(self.stabilizer)
        ratio = torch.div(grad_output, ratio, out=ratio)
        grad_pos, grad_neg = torch.autograd.grad((z_pos, z_neg), (pos, neg), (ratio, ratio))
        return grad_pos.mul_(pos.detach()).add_(grad_neg.mul_(neg.detach()))

    def _signed_stacked(self, module: nn.Conv2d, x: Tensor, grad_output: Tensor) -> Tensor:
        w_pos, b_pos = _modified_params(self.param_modifiers[0], module)
        w_neg, b_neg = _modified_params(self.param_modifiers[1], module)
        bias = b_pos if b_neg is None else b_neg if b_pos is None else b_pos + b_neg
        x = x.detach()
        both = torch.cat((x.clamp(min=0), x.clamp(max=0)), dim=1).requires_grad_(True)
        with torch.enable_grad():
            z = module._conv_forward(both, torch.cat((w_pos, w_neg), dim=1), bias)
        ratio = z.detach().add_(self.stabilizer)
        (grad,) = torch.autograd.grad(z, both, torch.div(grad_output, ratio, out=ratio))
        grad = grad.mul_(both.detach())
        return grad[:, : x.shape[1]].add_(grad[:, x.shape[1] :])


class GammaNonNegative(_DirectBasicHook, Gamma):
    """zennit's ``Gamma``; on inputs >= 0, three forwards and two backwards of the layer instead of five and five."""

    negative_pairs = (1, 3)
    forward_only = (4,)


class PassThrough(_DirectRule, Pass):
    """zennit's ``Pass`` (the relevance goes through unchanged) without running the layer's plain backward."""

    saves_input = False

    def relevance(self, module: nn.Module, x: Tensor | None, grad_output: Tensor) -> Tensor:
        return grad_output


class EpsilonDirect(_DirectBasicHook, Epsilon):
    """zennit's ``Epsilon`` without the layer's plain backward; on a ``Linear``, from its saved output.

    For a linear layer ``z`` is the output the forward already computed (minus the bias when it is a
    zero param), so the rule is one matrix product: ``x * ((R / (z + eps)) @ W)``; no re-run forward.
    """

    saves_output = True

    def __init__(self, epsilon: float = 1e-6, zero_params: Any = None) -> None:
        super().__init__(epsilon=epsilon, zero_params=zero_params)
        self.epsilon, self.zero_params = float(epsilon), zero_params
        self.zero_bias = _zeroes_bias(zero_params)

    def copy(self) -> EpsilonDirect:
        return EpsilonDirect(self.epsilon, self.zero_params)

    def relevance(
        self, module: nn.Module, x: Tensor | None, grad_output: Tensor, output: Tensor | None = None
    ) -> Tensor:
        if output is None or type(module) is not nn.Linear:
            return super().relevance(module, x, grad_output)
        assert x is not None
        z = output - module.bias if module.bias is not None and self.zero_bias else output
        denominator = stabilize(z, self.epsilon)
        ratio = torch.div(grad_output, denominator, out=denominator)
        return (ratio @ module.weight).mul_(x)


class _OnesInputRule(_DirectBasicHook):
    """A rule whose modified layer reads only ones (zennit's ``Flat``, ``WSquare``): on a plain zero-padded
    convolution, :func:`_ones_rule` (the denominator from ONE image of ones, then the conv's input gradient);
    elsewhere zennit's computation (its signed stabiliser is ``+ stabilizer`` here: the denominator is >= 0)."""

    def __init__(self, stabilizer: float = 1e-6, zero_params: Any = None) -> None:
        super().__init__(stabilizer=stabilizer, zero_params=zero_params)
        self.stabilizer, self.zero_params = float(stabilizer), zero_params

    def copy(self) -> _OnesInputRule:
        return type(self)(self.stabilizer, self.zero_params)

    def relevance(self, module: nn.Module, x: Tensor | None, grad_output: Tensor) -> Tensor:
        assert x is not None
        fast = _ones_rule(self.param_modifiers[0], self.stabilizer, module, x, grad_output)
        return super().relevance(module, x, grad_output) if fast is None else fast


class FlatDirect(_OnesInputRule, Flat):
    """zennit's ``Flat`` without the layer's plain backward (the denominator counts the taps that read the image)."""


class WSquareDirect(_OnesInputRule, WSquare):
    """zennit's ``WSquare`` (``R_i = w_ij^2 / sum_i w_ij^2 R_j``, the sum over the taps that read the image,
    not the zero padding) without the layer's plain backward."""


class ZBoxDirect(_DirectBasicHook, ZBox):
    """zennit's ``ZBox`` without the layer's plain backward."""


class NormDirect(_DirectBasicHook, Norm):
    """zennit's ``Norm`` (residual sums, average pooling) without the layer's plain backward.

    On a zennit ``Sum`` (the residual adds of our canonizers) it is one step: ``x * R / (sum + eps)``,
    broadcast over the summed axis.
    """

    def __init__(self, stabilizer: float = 1e-6) -> None:
        super().__init__(stabilizer=stabilizer)
        self.stabilizer = float(stabilizer)

    def copy(self) -> NormDirect:
        return NormDirect(self.stabilizer)

    def relevance(self, module: nn.Module, x: Tensor | None, grad_output: Tensor) -> Tensor:
        if not isinstance(module, Sum):
            return super().relevance(module, x, grad_output)
        assert x is not None
        ratio = grad_output / stabilize(x.sum(module.dim), self.stabilizer)
        return x * ratio.unsqueeze(module.dim)


def _plain_conv(module: nn.Module) -> bool:
    """A 2d convolution computed by torch's own forward (not, e.g., timm's dynamic 'same' padding)."""
    return isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward


def _modified_params(param_mod: Any, module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The weight and bias of ``module`` as the rule's zennit ``ParamMod`` makes them (detached)."""
    with ParamMod.ensure(param_mod)(module) as modified:
        bias = modified.bias
        return modified.weight.detach(), None if bias is None else bias.detach()


def _ones_rule(
    param_mod: Any, stabilizer: float, module: nn.Module, x: Tensor, grad_output: Tensor
) -> Tensor | None:
    """``W' R / (W' 1 + stabilizer)`` for a rule whose modified layer reads only ones (WSquare, Flat; ``W'``
    >= 0, so the denominator is positive), or None where ``module`` is not a plain zero-padded convolution.

    The denominator does not depend on the input: one image of ones gives it for the whole batch. The
    backward is the convolution's input gradient, computed directly.
    """
    if not (_plain_conv(module) and module.padding_mode == "zeros" and not isinstance(module.padding, str)):
        return None
    weight, bias = _modified_params(param_mod, module)
    z = module._conv_forward(torch.ones_like(x[:1]), weight, bias).add_(stabilizer)
    return torch.nn.grad.conv2d_input(
        x.shape, weight, grad_output / z, module.stride, module.padding, module.dilation, module.groups
    )


def _zeroes_bias(zero_params: Any) -> bool:
    """Whether zennit's ``zero_params`` (a name or a list of names) leaves the bias out of a rule."""
    return "bias" in ([zero_params] if isinstance(zero_params, str) else list(zero_params or ()))


def non_negative(x: Tensor) -> bool:
    """Whether ``x`` has no negative entry (one reduction pass; no boolean tensor as wide as ``x``)."""
    return x.numel() == 0 or bool(x.amin() >= 0)


def stabilize(z: Tensor, epsilon: float) -> Tensor:
    """zennit's stabiliser: ``z + epsilon * sign(z)`` with sign(+0) = 1, so no denominator is zero.

    Three passes into one new tensor (elementwise passes over wide layers dominate LRP's cost on a
    CPU). Only a ``-0.0`` differs from zennit (``-epsilon`` instead of ``+epsilon``).
    """
    return z.abs().add_(epsilon).copysign_(z)


class ResidualAdd(torch.autograd.Function):
    """``shortcut + branch`` with zennit's ``Norm`` rule as its backward: each gets its share of the sum.

    The relevance of a zennit ``Sum`` module over the stacked pair, without stacking the two activations
    into a new tensor at every residual add. ``ResidualAdd.apply(shortcut, branch, epsilon)``.
    """

    @staticmethod
    def forward(ctx: Any, shortcut: Tensor, branch: Tensor, epsilon: float) -> Tensor:
        ctx.save_for_backward(shortcut, branch)
        ctx.epsilon = epsilon
        return shortcut.detach() + branch.detach()

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor, Tensor, None]:
        shortcut, branch = ctx.saved_tensors
        denominator = stabilize(shortcut + branch, ctx.epsilon)
        ratio = torch.div(relevance, denominator, out=denominator)
        return shortcut * ratio, ratio.mul_(branch), None


class LayerNormEpsilon(_DirectRule, Hook):
    """AttnLRP's rule for LayerNorm: identity on the normalisation (the std is held constant), epsilon on the rest.

    With the std detached, LayerNorm is linear in its input (centring, scaling, the affine weight), and
    the epsilon rule of that linear map conserves the relevance: ``R_x = x * d/dx[z] (R / (z + eps))``.
    ``zero_params`` containing ``"bias"`` leaves the bias out of ``z`` (exact conservation).
    """

    def __init__(self, epsilon: float = 1e-6, zero_params: Any = None) -> None:
        super().__init__()
        self.epsilon = float(epsilon)
        self.use_bias = not _zeroes_bias(zero_params)

    def copy(self) -> LayerNormEpsilon:
        return LayerNormEpsilon(self.epsilon, None if self.use_bias else "bias")

    def relevance(self, module: nn.Module, x: Tensor | None, grad_output: Tensor) -> Tensor:
        assert x is not None
        # z_i = (x_i - mean x) s_i with s = weight / std (std constant): J^T g = g - mean(g) for g = s R / z
        dims = tuple(range(-len(module.normalized_shape), 0))
        centred = x - x.mean(dim=dims, keepdim=True)
        scale = (centred.pow(2).mean(dim=dims, keepdim=True) + module.eps).rsqrt()
        if module.weight is not None:
            scale = scale * module.weight.detach()
        z = centred * scale
        if self.use_bias and module.bias is not None:
            z = z + module.bias.detach()
        g = grad_output / stabilize(z, self.epsilon) * scale
        return x * (g - g.mean(dim=dims, keepdim=True))
