"""What a finished ``shortcut fit`` left in its folder: the test report, the stage's report of the model before
it ran, s-scores, SCORE's mining quality, the monitor's choice and the checkpoint the test after ``fit`` tested."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import yaml

SSCORE_KEYS = ("mean", "mean_used_neurons", "head_weighted_mean", "views")
# stages that report the model before they ran
STAGE_FILES = ("dfr.json", "afr.json", "prusc.json", "mining.json")
MINING_KEYS = ("lrp_mask_overlap_with_spurious_region", "precision_vs_oracle")


def reports(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]:
    """The run's test report (``metrics.json``, with PruSC's densities and SCORE's mining quality where they
    ran), the test report of the model before the stage, and the s-score summary."""
    before, sscore = None, None
    report = json.loads((run_dir / "metrics.json").read_text())
    if (run_dir / "metrics_val.json").is_file():  # the tested model on val: what a variant is chosen by
        report["val_worst_class"] = json.loads((run_dir / "metrics_val.json").read_text()).get("worst_class")
    for stage_file in STAGE_FILES:
        if (run_dir / stage_file).is_file():
            stage = json.loads((run_dir / stage_file).read_text())
            before = stage["before"].get("test")
            if "densities" in stage:  # how much of the model PruSC removed
                report.update(Prune_f=stage["densities"]["Prune_f"], Prune_h=stage["densities"]["Prune_h"])
                # the kept masks' model on val (recalibrated where asked): what a PruSC variant is chosen by
                report["final_val_worst_class"] = stage.get("after", {}).get("val", {}).get("worst_class")
            if stage_file == "mining.json":  # how well SCORE's selection found the shortcut's samples
                report["mining"] = mining_quality(stage)
    if (run_dir / "sscore.json").is_file():
        scores = json.loads((run_dir / "sscore.json").read_text())
        sscore = {k: scores.get(k) for k in SSCORE_KEYS}
        if "pruning" in scores:
            before = before or scores["pruning"]["before"]["test"]
            sscore["pruned_neurons"] = len(scores["pruning"]["neurons"])
    return report, before, sscore


def mining_quality(mined: dict[str, Any]) -> dict[str, Any]:
    """Per class of a ``mining.json``: samples selected, the top samples' LRP-mask overlap with the true
    spurious region, and the share of the selected ones the oracle rule accepts (where masks exist)."""
    return {
        name: {"selected": len(entry["selected_indices"]), **{k: entry.get(k) for k in MINING_KEYS}}
        for name, entry in mined["classes"].items()
    }


def checkpoint_state(run_dir: Path) -> dict[str, Any]:
    """The checkpoint callback's state in the run's ``last.ckpt`` (empty without one)."""
    import torch

    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return {}
    state = torch.load(last, map_location="cpu", weights_only=False).get("callbacks", {})
    return next((v for k, v in state.items() if "Checkpoint" in k and isinstance(v, dict)), {})


def selected_by(run_dir: Path) -> tuple[str | None, float | None]:
    """The checkpoint monitor of a run and the score of the checkpoint it tested (the best one), read from
    ``last.ckpt``'s checkpoint state; ``metrics_val.json`` holds the last validation instead."""
    state = checkpoint_state(run_dir)
    if state.get("best_model_score") is None:
        return None, None
    return state.get("monitor"), float(state["best_model_score"])


def stage_callbacks(run_dir: Path) -> list[Any]:
    """The run's stages, built from its ``config.yaml`` (class path and init arguments, in order); the
    callbacks that are not stages are left out."""
    from shortcut_lightning.stages import Stage

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    built = []
    for callback in (config.get("trainer") or {}).get("callbacks") or []:
        module, _, name = callback["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        if isinstance(cls, type) and issubclass(cls, Stage):
            built.append(cls(**(callback.get("init_args") or {})))
    return built


def tested_checkpoint(run_dir: Path) -> Path:
    """The checkpoint holding the model a finished run was tested on, as the CLI chose it
    (``shortcut_lightning.stages.tested_checkpoint`` of the run's stages and the checkpoint callback's best)."""
    from shortcut_lightning.stages import tested_checkpoint as tested

    folder = run_dir / "checkpoints"
    found = tested(stage_callbacks(run_dir), folder, checkpoint_state(run_dir).get("best_model_path"))
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {folder}")
    return found
