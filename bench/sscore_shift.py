"""How a stage moved the s-scores: broader Grad-CAM maps, or neurons that turned to the spurious region.

    python -m bench sscore-shift OUT_DIR [OUT_DIR ...]

Each OUT_DIR is the output of ``python -m bench stage ... --setting '{"sscore": true, ...}'``: it holds
``sscore_before/`` and ``sscore_after/`` (``SpuriousScore`` files with the per-neuron ``focus_share``)
and, for PruSC, ``prusc.json``. A map that covers more of the image scores closer to the mask's share of
the image (``uniform_map_score``) whatever the neuron encodes, so a mean s-score can rise only because
the maps got broader. Per run this prints the means before and after, and a least-squares fit over the
neurons of ``change in s-score = intercept + slope * change in focus share``, which splits the change of
the mean into ``slope * mean focus change`` (broader maps) and the intercept (the change at an unchanged
focus share). docs/methods.md (the s-score's two references) cites it.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path


def neurons(folder: Path) -> tuple[list[float], list[float]]:
    """Per-neuron s-scores and focus shares of one ``sscore.csv``."""
    rows = list(csv.DictReader((folder / "sscore.csv").open()))
    if not rows or "focus_share" not in rows[0]:
        raise SystemExit(
            f"{folder / 'sscore.csv'} has no focus_share column: rerun the stage with this version"
        )
    return [float(r["s_score"]) for r in rows], [float(r["focus_share"]) for r in rows]


def shift(out: Path) -> str:
    """One line: the means before and after, and the change split into broader maps and the intercept."""
    s_before, f_before = neurons(out / "sscore_before")
    s_after, f_after = neurons(out / "sscore_after")
    d_s = [a - b for a, b in zip(s_after, s_before, strict=True)]
    d_f = [a - b for a, b in zip(f_after, f_before, strict=True)]
    slope, intercept = statistics.linear_regression(d_f, d_s)
    summary = json.loads((out / "sscore_before" / "sscore.json").read_text())
    wga = ""
    if (out / "prusc.json").is_file():
        report = json.loads((out / "prusc.json").read_text())
        wga = f"test WGA {report['before']['test']['wga']:.3f} -> {report['after']['test']['wga']:.3f} | "
    return (
        f"{out.name}: {wga}mean s-score {statistics.mean(s_before):.3f} -> {statistics.mean(s_after):.3f} "
        f"(uniform map {summary['uniform_map_score']:.3f}) | focus share {statistics.mean(f_before):.3f} -> "
        f"{statistics.mean(f_after):.3f} | change = {intercept:+.3f} + {slope:.2f} x focus change: "
        f"{slope * statistics.mean(d_f):+.3f} from broader maps, {intercept:+.3f} at an unchanged focus share"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dirs", nargs="+", type=Path, help="outputs of python -m bench stage with sscore")


def main(args: argparse.Namespace) -> None:
    for out in args.out_dirs:
        print(shift(out), flush=True)
