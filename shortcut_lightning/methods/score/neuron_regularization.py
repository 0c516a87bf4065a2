"""``NeuronRegularization``: SCORE's fine-tuning that penalises the neurons spurious-positive samples light up."""

from __future__ import annotations

import json
import logging
from enum import Enum
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from shortcut_lightning.errors import ShortcutError
from shortcut_lightning.methods.score.mining_result import MiningResult
from shortcut_lightning.methods.score.penalty_terms import (
    PENALTIES,
    activation_term,
    contribution_term,
    masked_logit_term,
    random_neurons,
)
from shortcut_lightning.methods.score.spurious_positive_mining import SpuriousPositiveMining
from shortcut_lightning.probing.activations import reduce_channels
from shortcut_lightning.probing.hooks import OutputCapture
from shortcut_lightning.probing.model_parts import evaluating, find_module, freeze_before
from shortcut_lightning.reporting.rank_zero_log import rank_zero_log
from shortcut_lightning.stages import Stage

log = logging.getLogger(__name__)

NORMS = ("l1", "l2")
REGULARIZE_ON = ("all", "pairs", "class")


class RegularizationPhase(str, Enum):
    """Plain training before ``start_epoch``, then the penalty."""

    WAITING = "waiting"
    PENALISING = "penalising"


class NeuronRegularization(Stage):
    """Adds ``strength * penalty on the selected neurons`` to the training loss (SCORE, step 2).

    From ``start_epoch`` on, through the penalty seam (:func:`~shortcut_lightning.penalties.total_penalty`),
    so there is one loss and one backward, correct under DDP and AMP. ``penalty`` is what is penalised
    (``norm="l1"``: mean absolute value, ``"l2"``: mean square; :mod:`.penalty_terms`):

    * ``activation``: the selected channels of ``layer``, pooled over space;
    * ``contribution``: the selected channels' activation x gradient of the logit of the class they were
      mined for (explicit ``neurons``: of every class), summed over space: their share of that logit;
    * ``masked_logit``: the spurious region alone (the pairs' masked images) against a uniform prediction.

    ``regularize_on`` says where: ``all`` (the training batch), ``pairs`` (below) or ``class`` (the batch's
    samples of the class each neuron was mined for: the class the shortcut is positive for). The activation
    comes from the training forward itself (a hook), not from an extra pass. ``random_neurons=True`` is the
    control: as many channels per class as were selected, drawn (``seed``) from the others.

    The neurons come from, in this order: ``neurons`` (with ``layer``), ``mining_file`` (a
    ``mining.json`` of an earlier run, so a second run can reuse it), or the
    :class:`SpuriousPositiveMining` callback of the same trainer (followed each epoch, so the
    neurons of its later rounds, ``every_n_epochs``, are added). The whole network is fine-tuned;
    ``finetune_from="net.layer3"`` freezes every parameter registered before that module (under DDP
    this needs ``strategy="ddp_find_unused_parameters_true"``). ``fresh_optimizer=True`` clears the
    optimizers' state (e.g. Adam's moments) when the stage starts, so fine-tuning inside the ERM run
    steps as a separate fine-tuning run from the ERM checkpoint would; a resumed run does not clear it
    again.

    Logs ``train/penalty/neuron_regularization`` and ``score/selected_activation`` (the selected
    neurons' mean pooled activation) per step and epoch. The run tests the model as fine-tuned
    (choosing a checkpoint by validation accuracy could pick an epoch before the fine-tuning).

    Example::

        trainer = L.Trainer(max_epochs=9, callbacks=[
            SpuriousPositiveMining(start_epoch=6),
            NeuronRegularization(start_epoch=6, strength=1.0),
        ])

    Args:
        start_epoch: first epoch with the penalty.
        strength: the penalty's weight (lambda).
        norm: ``l1`` or ``l2``.
        neurons: channel indices of ``layer`` to penalise.
        layer: dotted name of the layer ``neurons`` index.
        mining_file: a ``mining.json`` to take layer and neurons from.
        finetune_from: freeze the parameters registered before this module.
        fresh_optimizer: clear the optimizers' state when the stage starts.
        regularize_on: ``all`` (ours: the training batch) or ``pairs``: the selected spurious-positive samples
            and their masked images (Fig. 2 of the SCORE paper), ``pairs_per_step`` of them per step, in turn,
            through an extra forward in eval mode (needs the miner in the same trainer); or ``class``.
        pairs_per_step: how many of the pairs one step penalises.
        penalty: ``activation``, ``contribution`` or ``masked_logit`` (which needs ``regularize_on="pairs"``).
        random_neurons: penalise random channels of the same count instead (the control).
        seed: the random channels' draw.
    """

    penalty_name = "neuron_regularization"
    stage_label = "SCORE fine-tuning"
    phases = RegularizationPhase
    transitions = ((RegularizationPhase.WAITING, RegularizationPhase.PENALISING),)
    start_hooks = ("epoch_start",)  # after a SpuriousPositiveMining listed before it mined at that epoch
    changes_model_at_fit_end = True  # test the fine-tuned model, not the best checkpoint by val accuracy
    tested_file = "last"
    uses_annotations = False  # the miner's selection is what may read annotations

    def __init__(
        self,
        start_epoch: int = 0,
        strength: float = 1.0,
        norm: str = "l1",
        neurons: list[int] | None = None,
        layer: str | None = None,
        mining_file: str | None = None,
        finetune_from: str | None = None,
        fresh_optimizer: bool = False,
        regularize_on: str = "all",
        pairs_per_step: int = 16,
        penalty: str = "activation",
        random_neurons: bool = False,
        seed: int = 0,
    ) -> None:
        if penalty not in PENALTIES:
            raise ShortcutError(f"penalty must be one of {', '.join(PENALTIES)}, got {penalty!r}")
        if penalty == "masked_logit" and regularize_on != "pairs":
            raise ShortcutError(
                "penalty='masked_logit' penalises the masked images of the spurious-positive pairs: set "
                f"regularize_on='pairs' (got {regularize_on!r})"
            )
        if norm not in NORMS:
            raise ShortcutError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if regularize_on not in REGULARIZE_ON:
            raise ShortcutError(
                f"regularize_on must be one of {', '.join(REGULARIZE_ON)}, got {regularize_on!r}"
            )
        if pairs_per_step < 1:
            raise ShortcutError(f"pairs_per_step must be >= 1, got {pairs_per_step}")
        if regularize_on == "pairs" and (neurons is not None or mining_file is not None):
            raise ShortcutError(
                "regularize_on='pairs' needs the selected samples of a SpuriousPositiveMining callback in the same "
                "trainer; neurons=[...] and mining_file carry no samples"
            )
        if strength < 0:
            raise ShortcutError(f"strength must be >= 0, got {strength}")
        if neurons is not None and layer is None:
            raise ShortcutError("neurons=[...] index the channels of a layer: give layer='...' too")
        if neurons is not None and not neurons:
            raise ShortcutError("neurons is empty: nothing to regularise")
        if mining_file is not None and not Path(mining_file).is_file():
            raise ShortcutError(
                f"mining_file {mining_file} does not exist; give the mining.json of a mining run"
            )
        super().__init__(start_epoch)
        self.strength = strength
        self.norm = norm
        self.explicit = (layer, list(neurons) if neurons is not None else None)
        self.mining_file = mining_file
        self.finetune_from = finetune_from
        self.fresh_optimizer = fresh_optimizer
        self.regularize_on = regularize_on
        self.pairs_per_step = pairs_per_step
        self.penalty = penalty
        self.random_neurons = random_neurons
        self.seed = seed
        self.optimizer_cleared = False
        self.layer: str | None = None
        self.neurons: list[int] | None = None  # the union penalised (after the random draw of the control)
        self.class_neurons: dict[int, list[int]] = {}  # class -> the neurons mined for it (as penalised)
        self._capture: OutputCapture | None = None
        self._index: Tensor | None = None
        self._class_index: dict[int, Tensor] = {}
        self._pairs: Tensor | None = None  # regularize_on="pairs": originals then masked images
        self._pair_classes: Tensor | None = None  # the class each pair image was mined for
        self._miner: SpuriousPositiveMining | None = None
        self._mined: dict[int, list[int]] = {}  # as resolved, before the control's draw

    # -- which neurons --------------------------------------------------------------------------
    def _resolve(self, trainer: L.Trainer) -> tuple[str, dict[int, list[int]]]:
        """The layer and, per class, the neurons mined for it (explicit ``neurons``: every class's)."""
        layer, neurons = self.explicit
        class_names = list(getattr(trainer.datamodule, "class_names", None) or [])
        if neurons is not None:
            return str(layer), self._every_class(neurons, class_names)
        if self.mining_file is not None:
            mined = json.loads(Path(self.mining_file).read_text())
            if not mined.get("neurons"):
                raise ShortcutError(f"{self.mining_file} selects no neuron: nothing to regularise")
            if self.regularize_on != "class" and not mined.get("classes"):
                return (layer or mined["layer"]), self._every_class(mined["neurons"], class_names)
            return (layer or mined["layer"]), MiningResult.from_dict(mined).neurons_by_class(class_names)
        miners = [cb for cb in trainer.callbacks if isinstance(cb, SpuriousPositiveMining)]
        if not miners:
            raise ShortcutError(
                "NeuronRegularization has no neurons: give neurons=[...] with layer=..., a mining_file, or add "
                "SpuriousPositiveMining to the trainer's callbacks"
            )
        if miners[0].neurons is None:
            raise ShortcutError(
                f"SpuriousPositiveMining has not run by epoch {trainer.current_epoch}: list it before "
                f"NeuronRegularization and give it start_epoch <= {self.start_epoch}"
            )
        self._miner = miners[0]
        return str(miners[0].layer_name), miners[0].neurons_by_class(class_names)

    def _every_class(self, neurons: list[int], class_names: list[str]) -> dict[int, list[int]]:
        if self.regularize_on == "class":
            raise ShortcutError(
                "regularize_on='class' needs the class each neuron was mined for: take the neurons from "
                "SpuriousPositiveMining or a mining_file with classes, not neurons=[...]"
            )
        return {c: list(neurons) for c in range(max(1, len(class_names)))}

    def _set_neurons(self, per_class: dict[int, list[int]]) -> None:
        """The neurons to penalise; the tensors are built (and the control drawn) on the next step."""
        self.class_neurons, self._mined = per_class, dict(per_class)
        self.neurons = _union(per_class)
        self._index, self._class_index, self._pairs = None, {}, None

    def _activate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.layer, per_class = self._resolve(trainer)
        self._set_neurons(per_class)
        module = find_module(pl_module, self.layer, "layer")
        self._capture = OutputCapture(module)
        if self.finetune_from is not None:
            frozen = freeze_before(pl_module, self.finetune_from)
            rank_zero_log(
                log, f"NeuronRegularization: froze {frozen} parameter tensors before {self.finetune_from}"
            )
        if self.fresh_optimizer and not self.optimizer_cleared:
            for optimizer in trainer.optimizers:
                optimizer.state.clear()
            self.optimizer_cleared = True
            rank_zero_log(log, "NeuronRegularization: cleared the optimizer state (fresh_optimizer=True)")
        rank_zero_log(
            log,
            f"NeuronRegularization: penalising neurons {self.neurons} of {self.layer} ({self.penalty}, "
            f"{self.norm}, on {self.regularize_on})",
        )

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """At the start of epoch ``start_epoch``: the neurons, the hook, the freezing and a fresh optimizer."""
        self._activate(trainer, pl_module)
        self.enter(RegularizationPhase.PENALISING)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.waiting:
            super().on_train_epoch_start(trainer, pl_module)
        elif self._capture is None:  # resumed in the stage: hook and freeze again (the optimizer stays)
            self._activate(trainer, pl_module)
        elif self.explicit[1] is None and self.mining_file is None:  # the miner may have mined again
            self._follow_miner(trainer)

    def _follow_miner(self, trainer: L.Trainer) -> None:
        """The neurons of the miner's rounds so far: a new round's are penalised from this epoch on."""
        self._pairs = None
        per_class = self._resolve(trainer)[1]
        if per_class != self._mined:
            self._set_neurons(per_class)
            rank_zero_log(log, f"NeuronRegularization: now penalising neurons {self.neurons} of {self.layer}")

    def _place(self, channels: int, device: torch.device) -> None:
        """First step: check the neurons exist, draw the control's, and put the indices on the device."""
        if max(self.neurons) >= channels:
            raise ShortcutError(
                f"NeuronRegularization: neuron {max(self.neurons)} does not exist in {self.layer}, which "
                f"has {channels} channels"
            )
        if self.random_neurons:
            try:
                self.class_neurons = random_neurons(self._mined, channels, self.seed)
            except ValueError as error:
                raise ShortcutError(f"NeuronRegularization random_neurons in {self.layer}: {error}") from None
            self.neurons = _union(self.class_neurons)
            rank_zero_log(
                log, f"NeuronRegularization: the control penalises random neurons {self.class_neurons}"
            )
        self._index = torch.tensor(self.neurons, dtype=torch.long, device=device)
        self._class_index = {
            c: torch.tensor(chosen, dtype=torch.long, device=device)
            for c, chosen in self.class_neurons.items()
        }

    def training_penalty(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, outputs: dict[str, Tensor]
    ) -> Tensor | None:
        if self._capture is None or self._capture.value is None:
            return None
        sample_class = None
        if self.regularize_on == "pairs":  # a forward of the spurious-positive pairs instead of the batch
            logits, sample_class = self._forward_pairs(trainer, pl_module)
        else:
            logits = outputs.get("logits")
            if self.regularize_on == "class":
                sample_class = batch["target"]
        activation = self._capture.value
        pooled = reduce_channels(activation)
        if self._index is None or self._index.device != pooled.device:  # first step: check and place once
            self._place(pooled.shape[1], pooled.device)
        selected = pooled[:, self._index]
        pl_module.log("score/selected_activation", selected.detach().mean(), on_step=True, on_epoch=True)
        if self.penalty == "masked_logit":
            value = masked_logit_term(logits)
        elif self.penalty == "contribution":
            value = contribution_term(activation, logits, self._class_index, sample_class, self.norm)
        elif self.regularize_on == "class":
            value = activation_term(activation, self._class_index, sample_class, self.norm)
        else:  # the union on every row: the stage's original form, bit for bit
            value = selected.abs().mean() if self.norm == "l1" else selected.pow(2).mean()
        return None if value is None else self.strength * value

    def _forward_pairs(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Tensor, Tensor]:
        """``pairs_per_step`` of the pairs, in turn (the same ones on every rank), through the model in eval
        mode (their masked images must not move BatchNorm's statistics); the capture then holds their layer.
        ``masked_logit`` takes the masked images alone. Returns their logits and the classes they were mined
        for."""
        if self._pairs is None:
            self._pairs = self._miner.pair_images(trainer.datamodule).to(pl_module.device)
            classes = torch.tensor(self._miner.pair_classes(trainer.datamodule), device=pl_module.device)
            self._pair_classes = classes.repeat(2)  # originals, then their masked images
        pairs, classes = self._pairs, self._pair_classes
        if self.penalty == "masked_logit":
            half = len(pairs) // 2
            pairs, classes = pairs[half:], classes[half:]
        n = len(pairs)
        start = (trainer.global_step * self.pairs_per_step) % n
        take = torch.arange(start, start + min(self.pairs_per_step, n), device=pairs.device) % n
        with evaluating(pl_module):
            logits = pl_module(pairs[take])
        return logits, classes[take]

    def extra_state(self) -> dict[str, Any]:
        return {"optimizer_cleared": self.optimizer_cleared}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Also a checkpoint of before the Stage base (no phase: it starts again at ``start_epoch``, as then)."""
        self.optimizer_cleared = bool(state.get("optimizer_cleared", False))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None


def _union(per_class: dict[int, list[int]]) -> list[int]:
    """Every class's neurons together, sorted (what the activation penalty on all samples indexes)."""
    return sorted({n for chosen in per_class.values() for n in chosen})
