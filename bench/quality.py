"""Group accuracies of a config over several seeds, through the `shortcut` CLI (not part of CI).

    python bench/quality.py --config configs/synthetic_erm.yaml --seeds 0 1 2 [-- extra CLI args]

Each seed sets the model seed, the sampler seed and the synthetic data seed, runs `shortcut fit`
(which tests the best checkpoint, or the model a stage rewrote), and reads the run's metrics.json;
with DFR also dfr.json's test report of the model before the refit, with s-score pruning the report
before pruning, and sscore.json's mean s-scores. Prints a mean +- std table
and writes bench/results/quality_<config>[_<tag>].json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import yaml

from shortcut_lightning.cli import main as cli_main
from shortcut_lightning.metrics import SUMMARY_KEYS

OUT = Path(__file__).resolve().parent / "results"
SSCORE_KEYS = ("mean", "mean_used_neurons", "head_weighted_mean", "views")
# stages that report the model before they ran
STAGE_FILES = ("dfr.json", "afr.json", "prusc.json", "mining.json")


RUN_RECORD = "bench_run.json"  # written when a run has finished: its arguments and wall time


def _checkpoint_state(run_dir: Path) -> dict:
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
    state = _checkpoint_state(run_dir)
    if state.get("best_model_score") is None:
        return None, None
    return state.get("monitor"), float(state["best_model_score"])


def tested_checkpoint(run_dir: Path) -> Path:
    """The checkpoint holding the model a finished run was tested on, as the CLI chose it: where a callback
    changes the model at the end of fit, the model it left (``<checkpoint_name>.ckpt`` of a ModelStage that
    saves one, else ``last.ckpt``: SCORE's fine-tuned model); otherwise the monitor's best, else ``last.ckpt``."""
    import importlib

    folder = run_dir / "checkpoints"
    callbacks = (
        yaml.safe_load((run_dir / "config.yaml").read_text()).get("trainer", {}).get("callbacks") or []
    )
    for callback in callbacks:
        module, _, name = callback["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        if getattr(cls, "changes_model_at_fit_end", False):
            name = getattr(cls, "checkpoint_name", None)
            if isinstance(name, property):  # derived from class attributes (LastLayerRefit: its stage name)
                name = name.fget(cls)
            saved = folder / f"{name}.ckpt"
            return saved if saved.is_file() else folder / "last.ckpt"
    best = _checkpoint_state(run_dir).get("best_model_path")
    if best and (folder / Path(best).name).is_file():
        return folder / Path(best).name
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    raise FileNotFoundError(f"no checkpoint in {folder}")


class NotRun(Exception):
    """A run that has not finished, asked for with ``run_missing=False``."""


def run(
    config: str, seed: int, save_dir: Path, extra: list[str], reuse: bool = False, run_missing: bool = True,
    data_seed: bool = True,
) -> tuple[dict, dict | None, dict | None, float]:  # fmt: skip
    """One ``shortcut fit`` of ``config`` with ``seed``; its test report, the report before the stage,
    s-scores and wall seconds. ``reuse``: a finished run with the same arguments is read, not rerun
    (how a killed suite resumes); ``run_missing=False`` raises :class:`NotRun` instead of running.
    ``data_seed``: the seed also draws the data (``SyntheticShortcuts``; a folder's data is fixed)."""
    seeds = ["--data.data_seed", str(seed)] if data_seed else []
    args = ["fit", "--config", config, "--seed_everything", str(seed), "--data.seed", str(seed),
            *seeds, "--trainer.logger.init_args.save_dir", str(save_dir),
            "--trainer.logger.init_args.version", f"seed{seed}", "--trainer.enable_progress_bar", "false", *extra]  # fmt: skip
    finished = None
    if reuse or not run_missing:  # only then are earlier runs read at all
        finished = next((d for d in save_dir.glob(f"*/seed{seed}") if _finished_with(d, args, config)), None)
    if finished is not None:
        run_dir = finished
        seconds = json.loads((run_dir / RUN_RECORD).read_text())["seconds"]
    elif not run_missing:
        raise NotRun(f"{config} seed {seed} has not finished in {save_dir}")
    else:
        for stale in save_dir.glob(f"*/seed{seed}"):  # files of an earlier run must not be read as this one's
            shutil.rmtree(stale)
        start = time.perf_counter()
        try:
            cli_main(args)
        except SystemExit as stop:  # an input error of ours: the CLI printed it and exits 2
            raise RuntimeError(
                f"shortcut fit exited with status {stop.code} (its error is printed above)"
            ) from None
        seconds = time.perf_counter() - start
        run_dir = next(save_dir.glob(f"*/seed{seed}"))
        record = {"args": args, "config_text": Path(config).read_text(), "seconds": seconds}
        (run_dir / RUN_RECORD).write_text(json.dumps(record, indent=2))
    before, sscore = None, None
    report = json.loads((run_dir / "metrics.json").read_text())
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
    return report, before, sscore, seconds


MINING_KEYS = ("lrp_mask_overlap_with_spurious_region", "precision_vs_oracle")


def mining_quality(mined: dict) -> dict:
    """Per class of a ``mining.json``: samples selected, the top samples' LRP-mask overlap with the true
    spurious region, and the share of the selected ones the oracle rule accepts (where masks exist)."""
    return {
        name: {"selected": len(entry["selected_indices"]), **{k: entry.get(k) for k in MINING_KEYS}}
        for name, entry in mined["classes"].items()
    }


def _finished_with(run_dir: Path, args: list[str], config: str) -> bool:
    """Whether ``run_dir`` holds a finished run of exactly these arguments and this config."""
    record = run_dir / RUN_RECORD
    if not (record.is_file() and (run_dir / "metrics.json").is_file()):
        return False
    saved = json.loads(record.read_text())
    same_config = yaml.safe_load(saved["config_text"]) == yaml.safe_load(Path(config).read_text())
    return saved["args"] == args and same_config  # comments in the config do not count


def summarise(reports: list[dict]) -> dict:
    out = {}
    for key in SUMMARY_KEYS:
        values = [r[key] for r in reports if r[key] is not None]
        if values:
            out[key] = {"mean": statistics.mean(values), "std": statistics.pstdev(values)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tag", default="")
    parser.add_argument("--runs", default="runs/bench", help="where the runs' logs go")
    parser.add_argument("extra", nargs="*", help="extra CLI arguments, after --")
    args = parser.parse_args()
    name = Path(args.config).stem + (f"_{args.tag}" if args.tag else "")
    reports, befores, sscores, seconds = [], [], [], []
    for seed in args.seeds:
        report, before, sscore, sec = run(args.config, seed, Path(args.runs) / name, args.extra)
        reports.append(report)
        befores.append(before)
        sscores.append(sscore)
        seconds.append(sec)
    summary = summarise(reports)
    sscore_summary = None
    if all(sscores):
        sscore_summary = {
            k: {
                "mean": statistics.mean(v[k] for v in sscores),
                "std": statistics.pstdev(v[k] for v in sscores),
            }
            for k in SSCORE_KEYS
        }
    before_summary = summarise(befores) if all(befores) else None
    OUT.mkdir(exist_ok=True)
    result = {"config": args.config, "extra": args.extra, "seeds": args.seeds, "summary": summary,
              "before_stage": before_summary, "wall_s": seconds, "reports": reports,
              "reports_before_stage": befores, "sscore": sscore_summary, "sscore_per_seed": sscores}  # fmt: skip
    (OUT / f"quality_{name}.json").write_text(json.dumps(result, indent=2))
    print(f"\n{name}: {len(args.seeds)} seeds, {statistics.mean(seconds):.0f} s per run (fit + test)")
    for key, stat in summary.items():
        line = f"  {key:<14} {stat['mean']:.3f} +- {stat['std']:.3f}"
        if before_summary and key in before_summary:
            line += f"   (before the stage: {before_summary[key]['mean']:.3f} +- {before_summary[key]['std']:.3f})"
        print(line)
    for key, stat in (sscore_summary or {}).items():
        print(f"  s-score {key:<20} {stat['mean']:.3f} +- {stat['std']:.3f}")


if __name__ == "__main__":
    main()
