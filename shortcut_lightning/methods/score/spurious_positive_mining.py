"""``SpuriousPositiveMining``: SCORE's search for samples the model gets right for a spurious reason (seed 002)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from shortcut_lightning.data.base import MASK_SOURCES, require_group_datamodule
from shortcut_lightning.errors import ShortcutError
from shortcut_lightning.methods.score.lrp_analysis import LRPMasking, analyse_samples, top_by_logit
from shortcut_lightning.methods.score.mining_figures import (
    masked_embedding_view,
    review_sheet,
    selection_panel,
)
from shortcut_lightning.methods.score.mining_result import MiningResult, SpuriousPairs
from shortcut_lightning.methods.score.spurious_positives import (
    confuser_similarity,
    neuron_scores,
    select_neurons,
)
from shortcut_lightning.probing.embedding_pass import (
    Embeddings,
    collect_embeddings,
    split_reports,
)
from shortcut_lightning.probing.layers import find_feature_layer
from shortcut_lightning.probing.model_parts import find_head, find_module
from shortcut_lightning.reporting.stage_report import stage_tables, write_stage_report
from shortcut_lightning.stages import decide_on_rank_zero

SELECTIONS = ("auto", "oracle", "manual")


class SpuriousPositiveMining(Callback):
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
    (pooled activation, per-channel relevance); the ``num_neurons`` best (or those above mean +
    ``z_score`` std) per class, united, are what :class:`NeuronRegularization` penalises.

    ``every_n_epochs`` mines again every that many epochs after ``start_epoch``, on the model as
    fine-tuned so far, and adds the new neurons to the ones already penalised: a shortcut that moves
    to other neurons once the first ones are suppressed is followed. ``mining.json`` then lists each
    round (``rounds``); ``neurons`` is their union and ``before`` the first round's table.

    Writes ``mining.json`` (indices, neurons and scores, every parameter), ``review_<class>.png`` per
    class (also to TensorBoard), ``masked_embeddings.png`` and ``checkpoints/before_mining.ckpt`` (resume
    from it to rerun the stage with other choices, e.g. ``manual`` picks from the review sheet); prints the group table of ``report_splits``
    before fine-tuning. Every rank computes the same selection from the gathered pass.

    Example::

        trainer = L.Trainer(max_epochs=9, callbacks=[
            SpuriousPositiveMining(start_epoch=6, selection="auto"),
            NeuronRegularization(start_epoch=6, strength=1.0),
        ])
        trainer.fit(ShortcutClassifier("resnet18", num_classes=2), datamodule=SyntheticShortcuts())

    Args:
        start_epoch: the epoch before which mining runs.
        every_n_epochs: mine again every this many epochs (default: once).
        selection: ``auto``, ``oracle`` or ``manual``.
        layer: dotted name of the layer whose neurons are scored; default: the block the embedding pools (a ViT: its last block's norm1).
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
        classes: classes to mine (default all).
        composite: LRP composite (:data:`~shortcut_lightning.xai.COMPOSITES`).
        batch_size: samples per LRP batch.
        report_splits: splits whose group table is printed and saved before fine-tuning.
    """

    stage_label = "SCORE"  # how the CLI's before/after table names the stage

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
        if num_neurons is None and z_score is None:
            raise ShortcutError("give num_neurons or z_score")
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ShortcutError(f"every_n_epochs must be >= 1 (or null: mine once), got {every_n_epochs}")
        if not 0 < top_q <= 1:
            raise ShortcutError(f"top_q must be in (0, 1], got {top_q}")
        self.start_epoch = start_epoch
        self.selection = selection
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
        self.classes = classes
        self.composite = composite
        self.batch_size = batch_size
        self.report_splits = tuple(report_splits)
        if neuron_samples not in ("selected", "confusers"):
            raise ShortcutError(f"neuron_samples must be 'selected' or 'confusers', got {neuron_samples!r}")
        self.neuron_samples = neuron_samples
        self.every_n_epochs = every_n_epochs
        self.result: MiningResult | None = None
        self.pairs: SpuriousPairs | None = None

    stage_label = "SCORE"
    changes_model_at_fit_end = False  # NeuronRegularization fine-tunes; mining only reads the model

    @property
    def uses_annotations(self) -> bool:
        return self.selection == "oracle"

    @property
    def neurons(self) -> list[int] | None:
        return None if self.result is None else self.result.neurons

    @property
    def before_reports(self) -> dict[str, Any]:
        """Group reports per split of the model as mined, before fine-tuning (the CLI prints them beside the test)."""
        return {} if self.result is None else self.result.before

    def pair_images(self, dm: Any) -> Tensor:
        """The last round's selected samples then their masked images [2n,3,H,W] (evaluation transforms)."""
        if self.pairs is None:
            raise ShortcutError(
                "SpuriousPositiveMining has selected no sample yet: it mines at its start_epoch"
            )
        return self.pairs.images(dm.dataset("train"))

    @property
    def layer_name(self) -> str | None:
        return None if self.result is None else self.result.layer

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.result is None:
            if epoch >= self.start_epoch:
                self.mine(trainer, pl_module)
        elif self.every_n_epochs is not None and epoch >= self.result.epoch + self.every_n_epochs:
            self.mine(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        pairs = None if self.pairs is None else self.pairs.state()
        return {"result": None if self.result is None else self.result.to_dict(), "pairs": pairs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved, pairs = state_dict.get("result"), state_dict.get("pairs")
        self.result = None if saved is None else MiningResult.from_dict(saved)
        self.pairs = None if pairs is None else SpuriousPairs(**pairs)

    # -- mining ---------------------------------------------------------------------------------
    def mine(self, trainer: L.Trainer, pl_module: L.LightningModule) -> MiningResult:
        """Runs the whole mining on the current model; returns (and keeps) the result.

        A later round (``every_n_epochs``) adds its neurons to the earlier rounds' and keeps their
        ``before`` table and ``before_mining.ckpt``: both describe the model before the stage.
        """
        tag = " [oracle: uses spurious annotations]" if self.uses_annotations else ""
        earlier = self.result
        if earlier is None:
            self._save_model_before(trainer)
        dm = require_group_datamodule(getattr(trainer, "datamodule", None), "SpuriousPositiveMining")
        head = find_head(pl_module, self.head)
        dataset = dm.dataset("train")
        classes = list(range(dm.num_classes)) if self.classes is None else [int(c) for c in self.classes]
        self._check_manual(dataset, classes)
        if self.selection == "oracle" and not dataset.has_masks:
            raise ShortcutError(
                f"selection='oracle' needs spurious-region masks and the train split of {type(dm).__name__} has "
                f"none ({MASK_SOURCES}); or use selection='auto' or 'manual'"
            )
        layer_name = self.layer or (earlier.layer if earlier is not None else None)
        if layer_name is None:  # the first round finds the layer; later rounds score the same one
            probe = torch.stack([dataset[i]["image"] for i in range(min(2, len(dataset)))]).to(
                pl_module.device
            )
            layer_name = find_feature_layer(pl_module, head, probe)
        layer = find_module(pl_module, layer_name, "layer")
        train = collect_embeddings(  # the ranking reads the logits: no rank keeps the features
            pl_module, dm.dataloader("train"), head, desc=f"SCORE: ranking train{tag}", features="none"
        )
        figures: dict[str, Any] = {}  # rank 0's, for the report it writes
        panels: dict[str, dict[str, np.ndarray]] = {}

        def decide() -> tuple[dict[str, Any], list[int], SpuriousPairs]:
            """The per-class analysis and selection on rank 0 (the broadcast decision of every rank)."""
            per_class: dict[str, Any] = {}
            neurons: set[int] = set()
            pair_indices: list[int] = []
            pair_masks: list[Tensor] = []
            for c in classes:
                name = dm.class_names[c]
                top = top_by_logit(train, c, own=True, n=self.top_m)
                pool = top + [i for i in self.manual_indices.get(c, []) if i not in top]
                found = self._analyse(pl_module, dataset, pool, c, layer, layer_name, head, f"{name}{tag}")
                confusers: dict[str, Tensor] | None = None
                if self.selection == "manual":
                    scores, chosen = None, [pool.index(i) for i in self.manual_indices.get(c, [])]
                else:
                    scores, chosen, confusers = self._select(
                        pl_module, dataset, train, found, c, layer, layer_name, head, tag
                    )
                passing = [pool[i] for i in chosen]
                pair_indices += passing
                pair_masks.append(found["masks"][chosen])
                entry: dict[str, Any] = {
                    "top_indices": top,
                    "selected_indices": passing,
                    "masked_prediction_kept": int(found["kept"].sum()),
                    "selection_scores": None if scores is None else [round(float(s), 5) for s in scores],
                }
                if found.get("overlap") is not None:
                    overlap = found["overlap"][: len(top)]
                    entry["lrp_mask_overlap_with_spurious_region"] = float(overlap.mean())
                    if chosen:
                        hits = found["overlap"][chosen] >= self.oracle_min_overlap
                        entry["precision_vs_oracle"] = float(hits.float().mean())
                if chosen:
                    activation, relevance_ = found["activation"][chosen], found["relevance"][chosen]
                    if self.neuron_samples == "confusers" and confusers is not None:
                        activation, relevance_ = confusers["activation"], confusers["relevance"]
                    s = neuron_scores(activation, relevance_)
                    picked = select_neurons(s, self.num_neurons, self.z_score)
                    entry["neurons"] = picked.tolist()
                    entry["neuron_scores"] = [round(float(s[j]), 6) for j in picked]
                    neurons.update(picked.tolist())
                else:
                    warnings.warn(
                        f"SCORE mining{tag}: no spurious-positive sample of class {name!r} passed the selection "
                        f"({self.selection}); no neuron is taken from this class",
                        stacklevel=3,  # mine(), through decide_on_rank_zero
                    )
                    entry["neurons"] = []
                per_class[name] = entry
                notes = None if scores is None else [f"{float(v):.2f}" for v in scores]
                figures[name] = review_sheet(
                    found["images"], found["masks"], pool, passing,
                    f"class {name}: top {len(top)} by logit, each beside its masked image (LRP top {self.top_q:.0%}); "
                    f"framed = selected ({self.selection}){tag}", notes, fill=self.fill,
                )  # fmt: skip
                panels[name] = selection_panel(found, chosen, self.oracle_min_overlap)
            if not neurons:
                raise ShortcutError(
                    f"SCORE mining{tag}: no sample passed the {self.selection!r} selection in any class, so there is "
                    "nothing to regularise. Look at review_<class>.png, then try selection='manual', a larger top_m "
                    "or top_q, or require_masked_prediction=False"
                )
            return per_class, sorted(neurons), SpuriousPairs(pair_indices, torch.cat(pair_masks), self.fill)

        per_class, neurons, self.pairs = decide_on_rank_zero(trainer, decide)
        rounds = [
            *([] if earlier is None else earlier.rounds),
            {"epoch": trainer.current_epoch, "neurons": neurons},
        ]
        self.result = MiningResult(
            selection=self.selection,
            uses_annotations=self.uses_annotations,
            layer=layer_name,
            neurons=sorted({n for r in rounds for n in r["neurons"]}),
            classes=per_class,
            before=self._reports(pl_module, dm, head) if earlier is None else earlier.before,
            epoch=trainer.current_epoch,
            rounds=rounds,
            parameters=self._parameters(),
        )
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank asks
        self._write(trainer, log_dir, self.result, figures, panels)
        return self.result

    @staticmethod
    def _save_model_before(trainer: L.Trainer) -> None:
        """``checkpoints/before_mining.ckpt``: rerun the stage from it (e.g. with ``manual`` picks), no new ERM."""
        checkpoint = getattr(trainer, "checkpoint_callback", None)
        if trainer.state.fn == "fit" and checkpoint is not None and checkpoint.dirpath:
            trainer.save_checkpoint(Path(checkpoint.dirpath) / "before_mining.ckpt")  # every rank calls it

    def _check_manual(self, dataset: Any, classes: list[int]) -> None:
        for c, indices in self.manual_indices.items():
            if c not in classes:
                raise ShortcutError(f"manual_indices names class {c}, which is not mined (classes {classes})")
            for i in indices:
                if not 0 <= i < len(dataset):
                    raise ShortcutError(
                        f"manual_indices[{c}] lists sample {i}, but the train split has samples 0..{len(dataset) - 1}"
                    )
                if int(dataset.targets[i]) != c:
                    raise ShortcutError(
                        f"manual_indices[{c}] lists sample {i}, which belongs to class {int(dataset.targets[i])}; "
                        "list each sample under its own class (see the indices on review_<class>.png)"
                    )

    def _analyse(
        self, pl_module: L.LightningModule, dataset: Any, indices: list[int], c: int, layer: nn.Module,
        layer_name: str, head: nn.Module, desc: str,
    ) -> dict[str, Tensor]:  # fmt: skip
        settings = LRPMasking(self.composite, self.top_q, self.dilation, self.fill, self.batch_size)
        return analyse_samples(pl_module, dataset, indices, c, layer, layer_name, head, desc, settings)

    def _select(
        self,
        pl_module: L.LightningModule,
        dataset: Any,
        train: Embeddings,
        found: dict[str, Tensor],
        c: int,
        layer: nn.Module,
        layer_name: str,
        head: nn.Module,
        tag: str,
    ) -> tuple[Tensor, list[int], dict[str, Tensor] | None]:
        """Selection scores (``auto``, ``oracle``), positions of the selected samples, the confusers' analysis."""
        n_top = min(self.top_m, len(found["kept"]))
        candidates = (
            found["kept"].clone() if self.require_masked_prediction else torch.ones_like(found["kept"])
        )
        candidates[n_top:] = False
        other = None
        if self.selection == "oracle":
            scores = found["overlap"]
            candidates &= scores >= self.oracle_min_overlap
        else:
            confusers = top_by_logit(train, c, own=False, n=self.n_confusers)
            other = self._analyse(
                pl_module, dataset, confusers, c, layer, layer_name, head, f"{c} confusers{tag}"
            )
            scores = confuser_similarity(found["embedding"], other["embedding"])
        order = [int(i) for i in scores.argsort(descending=True, stable=True) if candidates[i]]
        return scores, order[: self.num_selected], other

    def _reports(self, pl_module: L.LightningModule, dm: Any, head: nn.Linear) -> dict[str, Any]:
        return split_reports(pl_module, dm, head, self.report_splits, "SCORE (before):")

    def _parameters(self) -> dict[str, Any]:
        keys = ("start_epoch", "selection", "layer", "top_m", "top_q", "dilation", "fill", "num_selected",
                "manual_indices", "n_confusers", "oracle_min_overlap", "require_masked_prediction", "num_neurons",
                "z_score", "classes", "composite", "neuron_samples", "every_n_epochs")  # fmt: skip
        return {k: getattr(self, k) for k in keys}

    # -- output ---------------------------------------------------------------------------------
    @rank_zero_only
    def _write(
        self, trainer: L.Trainer, log_dir: Path, result: MiningResult, figures: dict[str, Any], panels: dict
    ) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        view = masked_embedding_view(panels)
        view.savefig(log_dir / "masked_embeddings.png", dpi=100)
        for name, figure in figures.items():
            figure.savefig(log_dir / f"review_{name}.png", dpi=110)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for name, figure in figures.items():
                    logger.experiment.add_figure(
                        f"score/review_{name}", figure, global_step=trainer.global_step
                    )
                logger.experiment.add_figure("score/masked_embeddings", view, global_step=trainer.global_step)
        tag = " [oracle: uses spurious annotations]" if result.uses_annotations else ""
        rounds = result.rounds
        new = f" (round {len(rounds)}: {rounds[-1]['neurons']})" if len(rounds) > 1 else ""
        summary = [f"SCORE mining{tag} at {result.layer}: neurons {result.neurons}{new}"]
        for name, entry in result.classes.items():
            extra = ""
            if "precision_vs_oracle" in entry:
                extra = f", precision vs oracle {entry['precision_vs_oracle']:.2f}"
            summary.append(f"  {name}: selected {entry['selected_indices']}{extra}")
        # the table before the stage comes with the first round only
        tables = stage_tables({"before SCORE": result.before}) if len(rounds) == 1 else None
        write_stage_report(log_dir, "mining.json", result.to_dict(), summary, tables)
