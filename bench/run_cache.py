"""Finished runs, found again by their resolved configuration (how a killed suite resumes without rerunning).

A run that finished leaves ``bench_run.json`` (its command and wall time) beside ``metrics.json`` and the
``config.yaml`` the CLI saved. A new run of the same seed in the same folder is that run when the saved
``config.yaml``, resolved again by today's parser, equals what the new command resolves to (less where the
files go): so a setting known to be inert can leave a config or the bench code without losing the runs
recorded with it, as long as the resolved configuration stays the same. A saved config today's parser
refuses (an argument since renamed) is no match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.resolved_config import resolve, run_key

RUN_RECORD = "bench_run.json"  # written when a run has finished: its arguments and wall time


def finished_run(save_dir: Path, seed: int, resolved: dict[str, Any]) -> Path | None:
    """The folder of a finished run of ``seed`` under ``save_dir`` whose configuration resolves to ``resolved``."""
    wanted = run_key(resolved)
    for run_dir in sorted(save_dir.glob(f"*/seed{seed}")):
        if not all((run_dir / name).is_file() for name in (RUN_RECORD, "metrics.json", "config.yaml")):
            continue
        try:
            saved = resolve(["fit", "--config", str(run_dir / "config.yaml")])
        except ValueError:  # a setting today's CLI no longer has: not this run
            continue
        if run_key(saved) == wanted:
            return run_dir
    return None


def recorded_seconds(run_dir: Path) -> float:
    """The wall time a finished run took (its record)."""
    return float(json.loads((run_dir / RUN_RECORD).read_text())["seconds"])


def record_run(run_dir: Path, args: list[str], seconds: float) -> None:
    """Marks ``run_dir`` finished: its command and wall time."""
    (run_dir / RUN_RECORD).write_text(json.dumps({"args": args, "seconds": seconds}, indent=2))
