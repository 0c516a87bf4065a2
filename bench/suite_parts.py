"""The suite's timed parts: speed (bench/speed.py's JSON files), scaling with the training set, and DFR under DDP.

- scaling: wall time of ERM (one epoch) and of each stage started from one ERM checkpoint, with the training
  set at 1x, 2x and 4x (validation and test fixed at 200 images each);
- ddp: DFR on that checkpoint with ``accelerator=cpu, devices=2`` (``ddp_spawn``) against one process: the same
  test metrics, and the wall-time ratio.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import RESULTS, ROOT
from bench.stage_configs import config_args, config_files, config_with, slug
from bench.suite_report import KEYS


def timed(args: list[str]) -> float:
    """Wall seconds of one ``shortcut`` CLI run in a subprocess (a fresh interpreter, as a user runs it)."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "shortcut_lightning", *args]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def logs(out: Path, name: str) -> list[str]:
    """CLI arguments that put a run's logs in ``out/name`` without a progress bar."""
    return [
        *("--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.name", name),
        *("--trainer.enable_progress_bar", "false"),
    ]


def scaling_stages(checkpoint: str) -> dict[str, tuple[list[str], dict, dict, str]]:
    """label -> (config files, callback overrides by class name, top-level overrides, subcommand)."""
    from_checkpoint = {"trainer__max_epochs": 1, "model__weights": checkpoint}
    score = {"SpuriousPositiveMining": {"start_epoch": 0}, "NeuronRegularization": {"start_epoch": 0}}
    prusc = {"MaskPruning": {"start_epoch": 0, "prune_epochs": 1}}
    return {
        "ERM epoch": (config_files("synthetic"), {}, {"trainer__max_epochs": 1}, "fit"),
        "DFR": (config_files("synthetic", "dfr"), {}, {}, "test"),
        "SCORE (mining + 1 epoch)": (config_files("synthetic", "score"), score, from_checkpoint, "fit"),
        "PruSC (clusters + 1 mask epoch)": (
            config_files("synthetic", "prusc"),
            prusc,
            from_checkpoint,
            "fit",
        ),
    }


def scaling(checkpoint: str, base: int, runs: Path, precision: list[str]) -> dict[str, Any]:
    """Wall time of ERM (one epoch) and of each stage from ``checkpoint`` at 1x, 2x, 4x the training set."""
    out: dict[str, Any] = {}
    for label, (files, overrides, top, command) in scaling_stages(checkpoint).items():
        configs = config_with(files, f"scaling_{slug(label)}", overrides, runs / "configs", **top)
        times = []
        for factor in (1, 2, 4):
            sizes = ["--data.n_train", str(base * factor), "--data.n_val", "200", "--data.n_test", "200"]
            args = [command, *config_args(configs), *sizes, *logs(runs, "scaling"), *precision]
            if command == "test":
                args += ["--ckpt_path", checkpoint]
            times.append(timed(args))
            print(f"[scaling] {label} x{factor}: {times[-1]:.1f} s", flush=True)
        out[label] = {"seconds": times, "ratio_2x": times[1] / times[0], "ratio_4x": times[2] / times[0]}
    return {"base_n_train": base, "stages": out}


def ddp(checkpoint: str, runs: Path) -> dict[str, Any]:
    """DFR on ``checkpoint``: 2 CPU processes (ddp_spawn) vs 1; test metrics and wall time."""
    result = {}
    for devices in (1, 2):
        name = f"ddp{devices}"
        args = ["test", *config_args(config_files("synthetic", "dfr")), "--ckpt_path", checkpoint]
        args += ["--trainer.accelerator", "cpu", "--trainer.devices", str(devices), *logs(runs, name)]
        if devices == 2:
            args += ["--trainer.strategy", "ddp_spawn"]
        seconds = timed(args)
        metrics_file = max((runs / name).glob("version_*/metrics.json"), key=lambda p: p.stat().st_mtime)
        metrics = json.loads(metrics_file.read_text())
        result[devices] = {"seconds": seconds, **{k: metrics[k] for k in KEYS}}
        print(f"[ddp] devices={devices}: wga {metrics['wga']:.4f} ({seconds:.1f} s)", flush=True)
    same = all(abs(result[1][k] - result[2][k]) < 1e-6 for k in KEYS)
    return {
        "one": result[1],
        "two": result[2],
        "same_metrics": same,
        "time_ratio": result[2]["seconds"] / result[1]["seconds"],
    }


def speed(quick: bool) -> dict[str, Any]:
    """Runs ``python -m bench speed`` and collects its JSON files."""
    args = [sys.executable, "-m", "bench", "speed", "--repeats", "1" if quick else "3"]
    if quick:
        args += ["--sscore-neurons", "64", "--n", "640"]
    subprocess.run(args, check=True, cwd=ROOT)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"speed_*_{device}.json"))}
