"""``SpuriousPositiveMining``: SCORE's search for samples the model gets right for a spurious reason
("Shortcut Mitigation via Spurious-Positive Samples"): its lifecycle. The steps live beside it: the LRP look
(``lrp_analysis``), the selection rules (``selection_rules``), a round per class (``mining_round``)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from shortcut_lightning.data.base import MASK_SOURCES, require_group_datamodule
from shortcut_lightning.errors import ShortcutError
from shortcut_lightning.methods.score.lrp_analysis import LRPMasking, LRPProbe
from shortcut_lightning.methods.score.mining_figures import save_mining_figures
from shortcut_lightning.methods.score.mining_result import (
    ORACLE_TAG,
    MiningResult,
    MiningRound,
    SpuriousPairs,
)
from shortcut_lightning.methods.score.mining_round import RoundFindings, RoundMiner
from shortcut_lightning.methods.score.selection_rules import SELECTIONS, check_manual_indices, selection_rule
from shortcut_lightning.probing.embedding_pass import collect_embeddings, split_reports
from shortcut_lightning.probing.layers import find_feature_layer
from shortcut_lightning.probing.model_parts import find_head, find_module
from shortcut_lightning.reporting.stage_report import stage_tables
from shortcut_lightning.stages import Stage, decide_on_rank_zero

NOT_RECORDED = ("self", "head", "batch_size", "report_splits")  # arguments mining.json's parameters leave out


class MiningPhase(str, Enum):
    """Before the first round, then mined (later rounds, ``every_n_epochs``, stay mined)."""

    WAITING = "waiting"
    MINED = "mined"


class SpuriousPositiveMining(Stage):
    """Finds spurious-positive samples per class with LRP and scores the neurons they light up (SCORE, step 1).

    At ``start_epoch`` (before that epoch trains; 0 mines the model as loaded), per class ``c``: rank
    the training samples of class ``c`` (evaluation transforms) by the class-``c`` logit and keep the
    top ``top_m``; LRP relevance for ``c``; mask of the top ``top_q`` share of positive relevance;
    masked image (the rest set to ``fill``); the model's prediction on it. Then ``num_selected``
    spurious-positive samples are chosen by ``selection``:

    * ``"manual"``: the dataset indices in ``manual_indices[c]``, picked from the review sheet;
    * ``"oracle"``: the samples whose relevance mask overlaps the ground-truth spurious mask most
      (at least ``oracle_min_overlap``); uses annotations, and every log line and file says so;
    * ``"auto"``, needing no annotations: the *confusers* of class ``c`` are the ``n_confusers``
      training samples of OTHER classes with the highest class-``c`` logit. Their class-``c`` evidence
      cannot be ``c``'s object, which they lack, so it is a shortcut; the selected samples are the
      top ones whose masked-region embedding is most similar to the confusers'. It needs the shortcut
      to occur in a few samples of another class (Waterbirds, CelebA: yes; ISIC's patches: no, use
      ``manual``).

    With ``require_masked_prediction`` a candidate must still be predicted ``c`` from its masked image
    alone. Neuron scores at ``layer``: ``s_j = mean over selected of a_j(x) * relu(R_j(x_masked))``
    (pooled activation, per-channel relevance; with ``neuron_samples="confusers"`` over the confusers);
    the ``num_neurons`` best (or those above mean + ``z_score`` std, or the best ``neuron_share`` of the
    layer's channels) per class, united, are what
    :class:`NeuronRegularization` penalises.

    ``every_n_epochs`` mines again every that many epochs after ``start_epoch``, on the model as
    fine-tuned so far, and adds the new neurons to the ones already penalised: a shortcut that moves
    to other neurons once the first ones are suppressed is followed. ``mining.json`` then lists each
    round (``rounds``); ``neurons`` is their union and ``before`` the first round's table.

    Writes ``mining.json`` (indices, neurons and scores, every parameter), ``review_<class>.png`` per
    class (also to TensorBoard), ``masked_embeddings.png`` and ``checkpoints/before_mining.ckpt`` (resume
    from it to rerun the stage with other choices, e.g. ``manual`` picks from the review sheet); logs the
    group table of ``report_splits`` before fine-tuning. Rank 0 decides; every rank gets its decision.

    Example::

        trainer = L.Trainer(max_epochs=9, callbacks=[
            SpuriousPositiveMining(start_epoch=6, selection="auto"),
            NeuronRegularization(start_epoch=6, strength=1.0),
        ])
        trainer.fit(ShortcutClassifier("resnet18", num_classes=2), datamodule=SyntheticShortcuts())

    Args:
        start_epoch: the epoch before which mining runs.
        selection: ``auto``, ``oracle`` or ``manual``.
        layer: dotted name of the layer whose neurons are scored; default: the block the embedding pools
            (a ViT: its last block's norm1).
        head: dotted name of the head; default: found.
        top_m: top samples per class.
        top_q: share of the pixels kept in a relevance mask.
        dilation: pixels the masks grow by.
        fill: value of the removed pixels (0 is the mean colour after normalisation).
        num_selected: spurious-positive samples kept per class (``auto``, ``oracle``).
        manual_indices: ``{class: [dataset indices]}`` for ``manual``.
        n_confusers: other-class samples of the ``auto`` rule.
        oracle_min_overlap: overlap coefficient of a mask with the spurious region for ``oracle``.
        require_masked_prediction: keep only candidates still predicted their class when masked.
        num_neurons: neurons selected per class.
        z_score: select by mean + z * std instead of ``num_neurons``.
        neuron_share: select this share of the layer's channels instead of ``num_neurons`` (e.g. 0.1).
        classes: classes to mine (default all).
        composite: LRP composite (:data:`~shortcut_lightning.xai.COMPOSITES`).
        batch_size: samples per LRP batch.
        report_splits: splits whose group table is logged and saved before fine-tuning.
        neuron_samples: whose neurons are scored: the ``selected`` samples or the ``confusers`` (``auto``).
        every_n_epochs: mine again every this many epochs (default: once).
    """

    stage_label = "SCORE"  # how the CLI's before/after table names the stage
    report_file = "mining.json"
    phases = MiningPhase
    transitions = ((MiningPhase.WAITING, MiningPhase.MINED),)
    start_hooks = ("epoch_start",)  # before the epoch trains, so start_epoch=0 mines the model as loaded
    changes_model_at_fit_end = False  # NeuronRegularization fine-tunes; mining only reads the model

    def __init__(
        self,
        start_epoch: int = 0,
        selection: str = "auto",
        layer: str | None = None,
        head: str | None = None,
        top_m: int = 100,
        top_q: float = 0.2,
        dilation: int = 0,
        fill: float = 0.0,
        num_selected: int = 10,
        manual_indices: dict[int, list[int]] | None = None,
        n_confusers: int = 20,
        oracle_min_overlap: float = 0.5,
        require_masked_prediction: bool = True,
        num_neurons: int | None = 10,
        z_score: float | None = None,
        neuron_share: float | None = None,
        classes: list[int] | None = None,
        composite: str = "epsilon_plus_flat",
        batch_size: int = 32,
        report_splits: Sequence[str] = ("val", "test"),
        neuron_samples: str = "selected",
        every_n_epochs: int | None = None,
    ) -> None:
        if selection not in SELECTIONS:
            raise ShortcutError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
        if selection == "manual" and not manual_indices:
            raise ShortcutError(
                "selection='manual' needs manual_indices: {class: [dataset indices]} picked from review_<class>.png"
            )
        for name, value in (("top_m", top_m), ("num_selected", num_selected), ("n_confusers", n_confusers)):
            if value < 1:
                raise ShortcutError(f"{name} must be >= 1, got {value}")
        if num_neurons is None and z_score is None and neuron_share is None:
            raise ShortcutError("give num_neurons, z_score or neuron_share")
        if z_score is not None and neuron_share is not None:
            raise ShortcutError("give z_score or neuron_share, not both (each replaces num_neurons)")
        if neuron_share is not None and not 0 < neuron_share <= 1:
            raise ShortcutError(
                f"neuron_share must be in (0, 1] (a share of the layer's channels), got {neuron_share}"
            )
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ShortcutError(f"every_n_epochs must be >= 1 (or null: mine once), got {every_n_epochs}")
        if not 0 < top_q <= 1:
            raise ShortcutError(f"top_q must be in (0, 1], got {top_q}")
        if neuron_samples not in ("selected", "confusers"):
            raise ShortcutError(f"neuron_samples must be 'selected' or 'confusers', got {neuron_samples!r}")
        super().__init__(start_epoch)
        self.selection = selection
        self.uses_annotations = selection == "oracle"
        self.layer = layer
        self.head = head
        self.top_m = top_m
        self.top_q = top_q
        self.dilation = dilation
        self.fill = fill
        self.num_selected = num_selected
        self.manual_indices = {int(k): [int(i) for i in v] for k, v in (manual_indices or {}).items()}
        self.n_confusers = n_confusers
        self.oracle_min_overlap = oracle_min_overlap
        self.require_masked_prediction = require_masked_prediction
        self.num_neurons = num_neurons
        self.z_score = z_score
        self.neuron_share = neuron_share
        self.classes = classes
        self.composite = composite
        self.batch_size = batch_size
        self.report_splits = tuple(report_splits)
        self.neuron_samples = neuron_samples
        self.every_n_epochs = every_n_epochs
        self.report: MiningResult | None = None
        self.pairs: SpuriousPairs | None = None

    # -- what the regularization and the CLI read ------------------------------------------------
    @property
    def result(self) -> MiningResult | None:
        """What the mining found so far (the stage's ``report``); ``None`` before the first round."""
        return self.report

    @property
    def neurons(self) -> list[int] | None:
        return None if self.report is None else self.report.neurons

    @property
    def layer_name(self) -> str | None:
        return None if self.report is None else self.report.layer

    @property
    def before_reports(self) -> dict[str, Any]:
        """Group reports per split of the model as mined, before fine-tuning (the CLI prints them beside the test)."""
        return {} if self.report is None else self.report.before

    def neurons_by_class(self, class_names: list[str]) -> dict[int, list[int]]:
        """Per class index, the neurons mined for it (:meth:`MiningResult.neurons_by_class`)."""
        if self.report is None:
            raise ShortcutError("SpuriousPositiveMining has mined no neuron yet: it mines at its start_epoch")
        return self.report.neurons_by_class(class_names)

    def pair_classes(self, dm: Any) -> list[int]:
        """The class each selected sample of :meth:`pair_images` was mined for, in the same order."""
        names = list(dm.class_names)
        return [
            names.index(name) for name, entry in self.report.classes.items() for _ in entry.selected_indices
        ]

    def pair_images(self, dm: Any) -> Tensor:
        """The last round's selected samples then their masked images [2n,3,H,W] (evaluation transforms)."""
        if self.pairs is None:
            raise ShortcutError(
                "SpuriousPositiveMining has selected no sample yet: it mines at its start_epoch"
            )
        return self.pairs.images(dm.dataset("train"))

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The first round, at the start of epoch ``start_epoch``."""
        self.mine(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.waiting:
            super().on_train_epoch_start(trainer, pl_module)
        elif (
            self.every_n_epochs is not None
            and self.report is not None
            and trainer.current_epoch >= self.report.epoch + self.every_n_epochs
        ):
            self.mine(trainer, pl_module)  # a later round, on the model as fine-tuned so far

    def mine(self, trainer: L.Trainer, pl_module: L.LightningModule) -> MiningResult:
        """Runs a whole round on the current model; returns (and keeps) the result.

        A later round (``every_n_epochs``) adds its neurons to the earlier rounds' and keeps their
        ``before`` table and ``before_mining.ckpt``: both describe the model before the stage.
        """
        tag = ORACLE_TAG if self.uses_annotations else ""
        earlier = self.report
        if earlier is None:
            self._save_model_before(trainer)
        dm = require_group_datamodule(getattr(trainer, "datamodule", None), "SpuriousPositiveMining")
        head = find_head(pl_module, self.head)
        dataset = dm.dataset("train")
        classes = list(range(dm.num_classes)) if self.classes is None else [int(c) for c in self.classes]
        check_manual_indices(self.manual_indices, dataset, classes)
        if self.selection == "oracle" and not dataset.has_masks:
            raise ShortcutError(
                f"selection='oracle' needs spurious-region masks and the train split of {type(dm).__name__} has "
                f"none ({MASK_SOURCES}); or use selection='auto' or 'manual'"
            )
        layer_name = self.layer or (earlier.layer if earlier is not None else None)
        if layer_name is None:  # the first round finds the layer; later rounds score the same one
            images = torch.stack([dataset[i]["image"] for i in range(min(2, len(dataset)))])
            layer_name = find_feature_layer(pl_module, head, images.to(pl_module.device))
        settings = LRPMasking(self.composite, self.top_q, self.dilation, self.fill, self.batch_size)
        lrp = LRPProbe(
            pl_module, dataset, find_module(pl_module, layer_name, "layer"), layer_name, head, settings
        )
        train = collect_embeddings(  # the ranking reads the logits: no rank keeps the features
            pl_module, dm.dataloader("train"), head, desc=f"SCORE: ranking train{tag}", features="none"
        )
        miner = self._round_miner(tag)
        names = {c: dm.class_names[c] for c in classes}
        found: RoundFindings = decide_on_rank_zero(trainer, lambda: miner.mine(lrp, train, names))
        self.pairs = found.pairs
        rounds = [
            *([] if earlier is None else earlier.rounds),
            MiningRound(trainer.current_epoch, found.neurons),
        ]
        self.report = MiningResult(
            selection=self.selection,
            uses_annotations=self.uses_annotations,
            layer=layer_name,
            neurons=sorted({n for r in rounds for n in r.neurons}),
            classes=found.reports,
            before=self._reports(pl_module, dm, head) if earlier is None else earlier.before,
            epoch=trainer.current_epoch,
            rounds=rounds,
            parameters=self._parameters(),
        )
        self.enter(MiningPhase.MINED)
        self._write(
            trainer, self.log_dir(trainer), found
        )  # the log directory is a collective: every rank asks
        return self.report

    def _round_miner(self, tag: str) -> RoundMiner:
        """How this round mines each class: the selection rule and the settings, from the arguments."""
        rule = selection_rule(
            self.selection,
            top_m=self.top_m,
            num_selected=self.num_selected,
            require_masked_prediction=self.require_masked_prediction,
            manual_indices=self.manual_indices,
            oracle_min_overlap=self.oracle_min_overlap,
            n_confusers=self.n_confusers,
        )
        return RoundMiner(
            rule,
            selection=self.selection,
            top_m=self.top_m,
            manual_indices=self.manual_indices,
            oracle_min_overlap=self.oracle_min_overlap,
            neuron_samples=self.neuron_samples,
            num_neurons=self.num_neurons,
            z_score=self.z_score,
            neuron_share=self.neuron_share,
            top_q=self.top_q,
            fill=self.fill,
            tag=tag,
        )

    def _save_model_before(self, trainer: L.Trainer) -> None:
        """``checkpoints/before_mining.ckpt``: rerun the stage from it (e.g. with ``manual`` picks), no new ERM.

        Written where a fit keeps checkpoints (none when checkpointing is off); every rank calls it."""
        checkpoint = getattr(trainer, "checkpoint_callback", None)
        if trainer.state.fn == "fit" and checkpoint is not None and checkpoint.dirpath:
            self.save_checkpoint(trainer, "before_mining")

    def _reports(self, pl_module: L.LightningModule, dm: Any, head: nn.Module) -> dict[str, Any]:
        return split_reports(pl_module, dm, head, self.report_splits, "SCORE (before):")

    def _parameters(self) -> dict[str, Any]:
        """The arguments ``mining.json`` records (all but where the head is, the LRP batch and the reports)."""
        names = inspect.signature(SpuriousPositiveMining.__init__).parameters
        return {k: getattr(self, k) for k in names if k not in NOT_RECORDED}

    @rank_zero_only
    def _write(self, trainer: L.Trainer, log_dir: Path, found: RoundFindings) -> None:
        save_mining_figures(trainer, log_dir, found.sheets, found.panels)
        result = self.report
        # the table before the stage comes with the first round only
        tables = stage_tables({"before SCORE": result.before}) if len(result.rounds) == 1 else None
        self.write_report(trainer, result.to_dict(), result.summary(), tables, log_dir=log_dir)

    # -- resumable state: phase, the result (report) and the last round's pairs -------------------
    def load_report(self, saved: Any) -> None:
        self.report = None if saved is None else MiningResult.from_dict(saved)

    def extra_state(self) -> dict[str, Any]:
        return {"pairs": None if self.pairs is None else self.pairs.state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pairs = state.get("pairs")
        self.pairs = None if pairs is None else SpuriousPairs(**pairs)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "result" in state_dict and "phase" not in state_dict:  # a checkpoint of before the Stage base
            saved = state_dict["result"]
            phase = MiningPhase.MINED if saved is not None else MiningPhase.WAITING
            state_dict = {"phase": phase.value, "report": saved, "pairs": state_dict.get("pairs")}
        super().load_state_dict(state_dict)
