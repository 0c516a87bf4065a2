"""Settings of one suite method on the embedded benchmark, each run on the suite's variants.

    python -m bench embedded-variants --method GroupDRO --set GroupDRO.step_size=0.1 --seeds 0
    python -m bench embedded-variants --method GroupDRO --extra "--model.optimizer.init_args.weight_decay 0.1"

The method's suite config (bench/suite.py's METHODS) with callback init arguments changed (``--set
Class.arg=value``, repeatable) and more CLI arguments (``--extra``). Prints one line per variant and seed: the
tested checkpoint's monitored validation score (the group-free selection rule: a setting is chosen by its mean
over variants, never by test) beside test worst-group and mean accuracy. Runs land in
``runs/embedded_variants/<tag>`` (``--tag``, or the settings); a finished run is read, not rerun. Nothing is
merged into the suite's JSON or docs: docs/methods.md (GroupDRO's search) and docs/results.md cite its lines.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
from pathlib import Path
from typing import Any

import yaml

from bench.quality import run
from bench.run_files import selected_by
from bench.stage_configs import config_with, slug
from bench.suite import METHODS


def overrides(settings: list[str]) -> dict[str, dict[str, Any]]:
    """``["GroupDRO.step_size=0.1"]`` -> ``{"GroupDRO": {"step_size": 0.1}}`` (values parsed as YAML)."""
    out: dict[str, dict[str, Any]] = {}
    for item in settings:
        target, _, value = item.partition("=")
        cls, _, arg = target.partition(".")
        if not (cls and arg and value):
            raise SystemExit(f"--set {item!r}: give Class.argument=value")
        out.setdefault(cls, {})[arg] = yaml.safe_load(value)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, choices=[label for label, _, _ in METHODS])
    parser.add_argument("--set", action="append", default=[], help="Class.argument=value")
    parser.add_argument("--extra", default="", help="more CLI arguments, one string")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=["background", "patch", "both"])
    parser.add_argument("--runs", default="runs/embedded_variants")
    parser.add_argument("--tag", help="the run folder's name (default: the settings; too long for many)")


def main(args: argparse.Namespace) -> None:
    label, files, base = next(m for m in METHODS if m[0] == args.method)
    changed = {**base, **overrides(args.set)}
    words = [slug(label), *args.set, *shlex.split(args.extra)]  # the run folder's name: its settings
    tag = args.tag or "".join(c if c.isalnum() or c in "_-." else "_" for c in "_".join(words))
    out = Path(args.runs) / tag
    configs = config_with(files, tag, changed, out / "configs")
    scores = []
    for variant in args.variants:
        for seed in args.seeds:
            extra = ["--data.spurious", variant, *shlex.split(args.extra)]
            report, _, _, seconds = run(configs, seed, out / variant, extra, reuse=True)
            monitor, score = selected_by(next((out / variant).glob(f"*/seed{seed}")))
            scores.append(score)
            print(
                f"[embedded] {tag} {variant} seed {seed}: tested checkpoint's {monitor} {score:.3f} | test wga "
                f"{report['wga']:.3f} mean {report['mean']:.3f} ({seconds:.0f} s)",
                flush=True,
            )
    valid = [s for s in scores if s is not None]
    if valid:
        print(f"[embedded] {tag}: mean selection score {statistics.mean(valid):.3f} over {len(valid)} runs")
