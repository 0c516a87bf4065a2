"""Group accuracies of a config over several seeds, through the ``shortcut`` CLI.

    python -m bench quality --config configs/synthetic/erm.yaml configs/synthetic/dfr.yaml --seeds 0 1 2

Each seed sets the model seed, the sampler seed and the synthetic data seed, runs ``shortcut fit`` (which
tests the best checkpoint, or the model a stage rewrote), and reads the run's metrics.json; with DFR also
dfr.json's test report of the model before the refit, with s-score pruning the report before pruning, and
sscore.json's mean s-scores. Prints a mean +- std table and writes bench/results/quality_<name>.json.
A finished run with the same resolved configuration is read, not rerun (``--resume``; bench/run_cache.py).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from bench import RESULTS
from bench.resolved_config import resolve
from bench.run_cache import finished_run, record_run, recorded_seconds
from bench.run_files import SSCORE_KEYS, reports
from bench.stage_configs import config_args
from shortcut_lightning.cli import main as cli_main
from shortcut_lightning.metrics import SUMMARY_KEYS


class NotRun(Exception):
    """A run that has not finished, asked for with ``run_missing=False``."""


def run(
    configs: list[str],
    seed: int,
    save_dir: Path,
    extra: list[str],
    reuse: bool = False,
    run_missing: bool = True,
    data_seed: bool = True,
) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None, float]:
    """One ``shortcut fit`` of the ``configs`` files with ``seed``; its test report, the report before the
    stage, s-scores and wall seconds. ``reuse``: a finished run that resolves to the same configuration is
    read, not rerun (how a killed suite resumes); ``run_missing=False`` raises :class:`NotRun` instead of
    running. ``data_seed``: the seed also draws the data (``SyntheticShortcuts``; a folder's data is fixed)."""
    seeds = ["--data.data_seed", str(seed)] if data_seed else []
    args = [
        "fit",
        *config_args(configs),
        *("--seed_everything", str(seed), "--data.seed", str(seed), *seeds),
        *("--trainer.logger.init_args.save_dir", str(save_dir)),
        *("--trainer.logger.init_args.version", f"seed{seed}", "--trainer.enable_progress_bar", "false"),
        *extra,
    ]
    finished = None
    if reuse or not run_missing:  # only then are earlier runs read at all
        finished = finished_run(save_dir, seed, resolve(args))
    if finished is not None:
        run_dir, seconds = finished, recorded_seconds(finished)
    elif not run_missing:
        raise NotRun(f"{' '.join(configs)} seed {seed} has not finished in {save_dir}")
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
        record_run(run_dir, args, seconds)
    return (*reports(run_dir), seconds)


def summarise(found: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and spread over seeds of each summary the reports hold."""
    out = {}
    for key in SUMMARY_KEYS:
        values = [r[key] for r in found if r[key] is not None]
        if values:
            out[key] = {"mean": statistics.mean(values), "std": statistics.pstdev(values)}
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", nargs="+", required=True, help="the config files, composed in order")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tag", default="", help="added to the result's name")
    parser.add_argument("--runs", default="runs/bench", help="where the runs' logs go")
    parser.add_argument("--extra", default="", help="more CLI arguments, one string")
    parser.add_argument("--resume", action="store_true", help="read finished runs of the same configuration")


def main(args: argparse.Namespace) -> None:
    name = "_".join(Path(c).stem for c in args.config[1:] or args.config)
    name = f"{Path(args.config[0]).parent.name}_{name}" + (f"_{args.tag}" if args.tag else "")
    extra = shlex.split(args.extra)
    found, befores, sscores, seconds = [], [], [], []
    for seed in args.seeds:
        report, before, sscore, sec = run(args.config, seed, Path(args.runs) / name, extra, reuse=args.resume)
        found.append(report)
        befores.append(before)
        sscores.append(sscore)
        seconds.append(sec)
    summary = summarise(found)
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
    RESULTS.mkdir(exist_ok=True)
    result = {
        "config": args.config,
        "extra": extra,
        "seeds": args.seeds,
        "summary": summary,
        "before_stage": before_summary,
        "wall_s": seconds,
        "reports": found,
        "reports_before_stage": befores,
        "sscore": sscore_summary,
        "sscore_per_seed": sscores,
    }
    (RESULTS / f"quality_{name}.json").write_text(json.dumps(result, indent=2))
    print(f"\n{name}: {len(args.seeds)} seeds, {statistics.mean(seconds):.0f} s per run (fit + test)")
    for key, stat in summary.items():
        line = f"  {key:<14} {stat['mean']:.3f} +- {stat['std']:.3f}"
        if before_summary and key in before_summary:
            b = before_summary[key]
            line += f"   (before the stage: {b['mean']:.3f} +- {b['std']:.3f})"
        print(line)
    for key, stat in (sscore_summary or {}).items():
        print(f"  s-score {key:<20} {stat['mean']:.3f} +- {stat['std']:.3f}")
