"""Learnable weight masks (straight-through Gumbel-sigmoid) for PruSC, as torch parametrizations.

A mask sits on a module's ``weight`` through :mod:`torch.nn.utils.parametrize`: the weight keeps its
values (``parametrizations.weight.original``) and the module computes with ``weight * mask``. The mask
has three modes, stored in the model's state so a checkpoint describes itself: ``off`` (the weight as
is), ``learn`` (a hard sample ``1[logit + logistic noise > 0]`` in training with the sigmoid's
gradient, straight through; the deterministic ``1[logit > 0]`` in evaluation) and ``fixed``
(``1[logit > 0]`` always). :func:`bake_masks` multiplies the masks in and leaves a plain network.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from shortcut_lightning.errors import ModelError, ShortcutError
from shortcut_lightning.methods.prusc.conv_reach import reachable_of

MODES = ("off", "learn", "fixed")
MASKABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class GumbelSigmoidMask(nn.Module):
    """``weight -> weight * mask(logits)``; one logit per weight, frozen until :meth:`set_mode` ``learn``.

    The mode is a Python attribute, read at every forward of every masked layer: reading it from a
    tensor (``int(buffer)``) would wait for the GPU there. The ``mode_id`` buffer only records it in the
    model's state, so a checkpoint (today's or an older one) describes itself; it is written by
    :meth:`set_mode` and read back when a state dict is loaded.
    """

    def __init__(self, shape: torch.Size, init_logit: float = 3.0, temperature: float = 1.0) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.full(shape, float(init_logit)), requires_grad=False)
        self.register_buffer("mode_id", torch.zeros((), dtype=torch.long))
        self.temperature = temperature
        self._mode = MODES[0]

    @property
    def mode(self) -> str:
        return self._mode

    def set_mode(self, mode: str) -> None:
        self.mode_id.fill_(MODES.index(mode))  # a device op, no wait: the record a checkpoint carries
        self._mode = mode
        self.logits.requires_grad_(mode == "learn")

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict, strict: bool, *args: Any
    ) -> None:
        """Loads as any module does, then takes the mode from the loaded ``mode_id`` (a CPU tensor when it
        comes from a checkpoint). As before, loading sets the mode only: ``requires_grad`` stays as it is."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args)
        saved = state_dict.get(prefix + "mode_id")
        if isinstance(saved, Tensor) and saved.shape == self.mode_id.shape:
            self._mode = MODES[int(saved)]

    def hard(self) -> Tensor:
        """The deterministic mask ``1[logit > 0]``."""
        return (self.logits > 0).to(self.logits.dtype)

    def deterministic(self, weight: Tensor) -> Tensor:
        """The weight as evaluation sees it: as is when ``off``, else times :meth:`hard`."""
        if self.mode == "off":
            return weight
        return weight * self.hard().detach().to(weight.dtype)

    def forward(self, weight: Tensor) -> Tensor:
        if self.mode == "learn" and self.training:
            return _GumbelSigmoidMasked.apply(weight, self.logits, self.temperature)
        return self.deterministic(weight)


class _GumbelSigmoidMasked(torch.autograd.Function):
    """``weight * 1[z > 0]`` with ``z = (logit + logistic noise) / T``; backward through ``sigmoid(z)``.

    The straight-through Gumbel-sigmoid in one node: the same values and gradients as composing it
    from autograd ops, without their intermediate tensors (each the size of the weights).
    """

    @staticmethod
    def forward(ctx: Any, weight: Tensor, logits: Tensor, temperature: float) -> Tensor:
        z = logistic_noise(logits).add_(logits)  # logit + logistic noise
        if temperature != 1:
            z.div_(temperature)
        ctx.save_for_backward(weight, z)
        ctx.temperature = temperature
        # 1[z > 0] as floats (sign, then clamp) and a product: vectorised passes, where a boolean
        # comparison feeding ``torch.where`` costs about twice as much on the CPU; in the weight's dtype
        return weight * z.sign().clamp_(min=0).to(weight.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        weight, z = ctx.saved_tensors
        grad_weight = torch.where(z > 0, grad, 0.0) if ctx.needs_input_grad[0] else None
        grad_logits = None
        if ctx.needs_input_grad[1]:
            # g * w * s * (1 - s) with s = sigmoid(z), in one kernel
            grad_logits = torch.ops.aten.sigmoid_backward(grad * weight, torch.sigmoid(z))
            if ctx.temperature != 1:
                grad_logits.div_(ctx.temperature)
            grad_logits = grad_logits.to(z.dtype)
        return grad_weight, grad_logits, None


def logistic_noise(like: Tensor) -> Tensor:
    """Standard logistic noise ``log(u / (1 - u))`` shaped like ``like``, with ``u`` at 16-bit resolution.

    ``u = (k + 0.5) / 65536`` for 16 random bits ``k``, four per random 64-bit integer: on the CPU this
    costs a quarter of the generator calls of ``torch.rand``, whose draw is the largest single cost of a
    mask-learning step at 32 px. A mask sample ``1[logit + noise > 0]`` keeps a weight with probability
    ``sigmoid(logit)`` to within 2**-16.
    """
    n = like.numel()
    # the full 64-bit range: random_'s default leaves the top bit 0, which would bias every fourth draw
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device).random_(-(2**63), None)
    u = bits.view(torch.int16)[:n].to(torch.float32).add_(32768.5).mul_(2.0**-16)
    return u.logit_().view(like.shape).to(like.dtype)


def maskable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every conv and linear layer of ``model`` by dotted name (BatchNorm and the rest stay unmasked)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MASKABLE) and name}


def attach_masks(
    model: nn.Module, patterns: Sequence[str] | None = None, init_logit: float = 3.0, temperature: float = 1.0
) -> dict[str, GumbelSigmoidMask]:
    """Puts a mask (mode ``off``) on the weight of every maskable module whose name matches a pattern.

    ``patterns`` are shell-style (``"net.layer4*"``, ``"net.fc"``); ``None`` masks every conv and linear
    layer. Modules that already carry a mask keep it. A pattern that matches nothing is an error that
    lists what exists.
    """
    candidates = maskable_modules(model)
    chosen = dict(candidates)
    if patterns is not None:
        chosen = {}
        for pattern in patterns:
            hits = {n: m for n, m in candidates.items() if fnmatch.fnmatchcase(n, pattern)}
            if not hits:
                names = list(candidates)
                shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
                raise ModelError(
                    f"modules pattern {pattern!r} matches no conv or linear layer; they are: {shown}"
                )
            chosen.update(hits)
    masks = {}
    for name, module in chosen.items():
        existing = find_mask(module)
        if existing is None:
            existing = GumbelSigmoidMask(module.weight.shape, init_logit, temperature).to(
                module.weight.device
            )
            parametrize.register_parametrization(module, "weight", existing, unsafe=True)
        masks[name] = existing
    return masks


def find_mask(module: nn.Module) -> GumbelSigmoidMask | None:
    """The mask on ``module.weight``, if it has one."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, GumbelSigmoidMask)), None)


def model_masks(model: nn.Module) -> dict[str, GumbelSigmoidMask]:
    """Every mask of ``model`` by the name of the module it sits on."""
    found = {name: find_mask(m) for name, m in model.named_modules() if name}
    return {name: mask for name, mask in found.items() if mask is not None}


def original_weight(module: nn.Module) -> Tensor:
    """A module's own weight, under a mask or not."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def bake_masks(model: nn.Module) -> int:
    """Puts every mask's evaluation weight in place of the mask: a plain network. Returns how many were baked."""
    baked = 0
    for module in list(model.modules()):
        mask = find_mask(module)
        if mask is None:
            continue
        weight = original_weight(module)
        with torch.no_grad():
            value = mask.deterministic(weight)
        requires_grad = weight.requires_grad
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        module.weight.data.copy_(value)
        module.weight.requires_grad_(requires_grad)
        baked += 1
    return baked


def set_density(
    masks: dict[str, GumbelSigmoidMask], density: float, reachable: dict[str, Tensor] | None = None
) -> None:
    """Shifts the logits so that exactly a share ``density`` of the masked weights is kept (ties by position).

    With ``reachable`` (from :func:`~shortcut_lightning.methods.prusc.conv_reach.reachable_weights`) the share is of
    the masked weights that can read an image pixel, and the others, which multiply only padding, are
    pruned: a density then means the same at every image size.
    """
    if not 0 < density < 1:
        raise ShortcutError(f"target_density must be between 0 and 1 (exclusive), got {density}")
    flat = torch.cat([m.logits.detach().flatten().float().cpu() for m in masks.values()])
    if reachable is None:
        live = torch.ones(len(flat), dtype=torch.bool)
    else:
        live = torch.cat([reachable_of(reachable, n, m.logits).cpu().flatten() for n, m in masks.items()])
    k = max(1, round(density * int(live.sum())))
    order = torch.where(live, flat, -torch.inf).argsort(descending=True, stable=True)
    keep = torch.zeros(len(flat), dtype=torch.bool)
    keep[order[:k]] = True
    shifted = flat - flat[order[k - 1]]
    shifted = torch.where(keep, shifted.clamp(min=1e-3), shifted.clamp(max=-1e-3))
    offset = 0
    with torch.no_grad():
        for mask in masks.values():
            n = mask.logits.numel()
            mask.logits.copy_(shifted[offset : offset + n].view_as(mask.logits))
            offset += n


def densities(model: nn.Module, reachable: dict[str, Tensor] | None = None) -> dict[str, float]:
    """Kept share of the weights per masked layer, plus ``Prune_f`` and ``Prune_h`` (pruned shares).

    ``Prune_f`` counts every conv and linear weight of the model (unmasked layers as kept); ``Prune_h``
    is the pruned share of the last linear layer (the head). With ``reachable`` (from
    :func:`~shortcut_lightning.methods.prusc.conv_reach.reachable_weights`), ``Prune_f_reachable`` is the pruned share
    of the weights that can read an image pixel at that input size: the others multiply only padding.
    """
    out: dict[str, float] = {}
    total = kept = 0
    total_reach = kept_reach = 0
    head_name = None
    for name, module in maskable_modules(model).items():
        weight = original_weight(module)
        mask = find_mask(module)
        n = weight.numel()
        hard = None if mask is None else mask.hard()
        k = n if hard is None else int(hard.sum())
        if mask is not None:
            out[name] = k / n
        total += n
        kept += k
        if reachable is not None:
            reach = reachable_of(reachable, name, weight)
            total_reach += int(reach.sum())
            kept_reach += int(reach.sum() if hard is None else (reach & hard.bool()).sum())
        if isinstance(module, nn.Linear):
            head_name, head_kept, head_n = name, k, n
    out["Prune_f"] = 1 - kept / max(total, 1)
    out["Prune_h"] = 1 - head_kept / head_n if head_name is not None else 0.0
    if reachable is not None:
        out["Prune_f_reachable"] = 1 - kept_reach / max(total_reach, 1)
    return out


def density_summary(found: dict[str, float]) -> str:
    """One line of :func:`densities`: the pruned shares of all weights, of the head, of the reachable weights."""
    text = f"Prune_f {found['Prune_f']:.3f}, Prune_h {found['Prune_h']:.3f}"
    if "Prune_f_reachable" in found:
        text += f", Prune_f of the weights that reach an image pixel {found['Prune_f_reachable']:.3f}"
    return text


Sparsity = Literal["probability", "logit"]  # the pull towards pruning: see sparsity_term


def sparsity_term(masks: dict[str, GumbelSigmoidMask], form: Sparsity = "probability") -> Tensor:
    """The pull towards pruning: the sum of keep probabilities (``probability``, ours; bounded, its gradient
    fades as a logit saturates) or of the logits themselves (``logit``, the released PruSC code; a constant
    pull on every logit, which prunes far more at the same ``lambda_sparse``)."""
    if form == "logit":
        return torch.stack([m.logits.sum() for m in masks.values()]).sum()
    return torch.stack([torch.sigmoid(m.logits).sum() for m in masks.values()]).sum()


def step_mask_logits(
    trainer: L.Trainer, masks: dict[str, GumbelSigmoidMask], optimizer: torch.optim.Optimizer
) -> None:
    """One step of the mask logits' own optimizer, their gradients averaged over the DDP ranks first.

    A step with a non-finite gradient (an AMP overflow) is skipped, as the module's optimizer skips it. Deciding
    that reads one flag from the device: the stage's one wait for it per optimizer step (the masked forward,
    its backward and the penalty have none).
    """
    logits = [m.logits for m in masks.values() if m.logits.grad is not None]
    if not logits:
        return
    flat = torch.cat([p.grad.flatten() for p in logits])
    if trainer.world_size > 1:
        flat = trainer.strategy.reduce(flat, reduce_op="mean")
        offset = 0
        for p in logits:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()
    if bool(torch.isfinite(flat).all()):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def set_masks_mode(
    model: nn.Module, masks: dict[str, GumbelSigmoidMask], mode: str, train_weights: bool
) -> None:
    """Puts every mask of ``masks`` in ``mode`` and lets every other parameter of ``model`` train, or freezes it."""
    logits = {id(m.logits) for m in masks.values()}
    for param in model.parameters():
        if id(param) not in logits:
            param.requires_grad_(train_weights)
    for mask in masks.values():
        mask.set_mode(mode)


def log_densities(pl_module: L.LightningModule, reachable: dict[str, Tensor] | None) -> None:
    """Logs :func:`densities` as ``prune/density/<layer>`` and ``prune/Prune_f`` (and the other shares)."""
    for name, value in densities(pl_module, reachable).items():
        key = name if name.startswith("Prune_") else f"density/{name}"
        pl_module.log(f"prune/{key}", value, on_epoch=True, rank_zero_only=True)


def weight_masks(model: nn.Module) -> dict[str, Tensor]:
    """What evaluation multiplies each masked weight by, for ``backbones.PLAIN_WEIGHTS``: a 0/1 (bool) mask
    by the plain weight's state-dict name (``net.fc.weight``), only where a mask is on and prunes something.

    With the ``state_dict`` (which holds the weight as ``...parametrizations.weight.original``) it gives
    :func:`plain_state_dict` without a second copy of any weight.
    """
    found = {}
    for name, mask in model_masks(model).items():
        if mask.mode != "off":
            keep = mask.logits.detach() > 0
            if not bool(keep.all()):  # a wait for the device, once per mask when a checkpoint is saved
                found[f"{name}.weight"] = keep
    return found


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` as if every mask were baked (:func:`bake_masks`), without changing ``model``.

    A masked weight ``P.parametrizations.weight.original`` (and its mask's logits and mode) becomes ``P.weight``
    as evaluation sees it; every other entry is kept.
    """
    modules = dict(model.named_modules())
    masked = {name: (mask, original_weight(modules[name])) for name, mask in model_masks(model).items()}
    plain: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        module_name = key.split(".parametrizations.weight.", 1)[0]
        if ".parametrizations.weight." not in key or module_name not in masked:
            plain[key] = value
        elif key.endswith(".parametrizations.weight.original"):
            mask, weight = masked[module_name]
            with torch.no_grad():
                plain[f"{module_name}.weight"] = mask.deterministic(weight).detach().clone()
    return plain
