"""The results suite: quality, speed, scaling and DDP in one command; regenerates docs/results.md's head.

    python -m bench suite            # make bench: 3 seeds x 3 variants x every method, full speed and scaling
    python -m bench suite --quick    # make bench-quick: seed 0, background variant, 1500 training images
    python -m bench suite --resume   # after a kill: the runs that finished are read, the rest run
    python -m bench suite --parts quality --variants both   # one part, one variant: merged into the last JSON

Parts (``--parts quality,speed,scaling,ddp``):

- quality: each method's composed config (configs/synthetic/erm.yaml and the stage's file: ERM, then the stage,
  in one ``shortcut fit``) on the embedded default's variants, through bench/quality.py's runner. The ERM row
  is the model each DFR run starts from (its last epoch, tested in the same run); every stage row also has
  its own "before".
- speed: ``python -m bench speed`` (each ratio against its baseline in the same run).
- scaling and ddp: bench/suite_parts.py.

Writes bench/results/suite[_quick].json, docs/results.png and the generated part of docs/results.md
(between its ``<!-- suite -->`` markers; the hand-written sections below are kept).
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path
from typing import Any

from bench import RESULTS, ROOT
from bench.docs_sections import DOC
from bench.environment import environment, resolve_precision
from bench.quality import NotRun, run, summarise
from bench.stage_configs import config_files, config_with, slug
from bench.suite_parts import ddp, scaling, speed
from bench.suite_report import plot_path, render

PARTS = ("quality", "speed", "scaling", "ddp")
# label, config files, callback init_args overridden (by class name)
METHODS: list[tuple[str, list[str], dict[str, dict[str, Any]]]] = [
    ("DFR", config_files("synthetic", "dfr"), {}),
    ("SCORE (auto)", config_files("synthetic", "score"), {}),
    (
        "SCORE (oracle)",
        config_files("synthetic", "score"),
        {"SpuriousPositiveMining": {"selection": "oracle"}},
    ),
    ("PruSC", config_files("synthetic", "prusc"), {}),
    ("s-score pruning", config_files("synthetic", "sscore"), {}),
    ("AFR", config_files("synthetic", "afr"), {}),
    ("JTT", config_files("synthetic", "jtt"), {}),
    ("GroupDRO", config_files("synthetic", "groupdro"), {}),
]


def quality(
    seeds: list[int],
    variants: list[str],
    extra: list[str],
    runs: Path,
    resume: bool = False,
    finished_only: bool = False,
    methods: list[str] | None = None,
) -> dict[str, Any]:
    """Every method on every variant and seed: summaries (mean, std), per-seed reports and wall times.
    ``resume``: runs that finished before (the same resolved configuration) are read, not rerun;
    ``finished_only``: only those are read, the others are listed as not run; ``methods``: these rows only
    (the ERM row comes from DFR's runs: without DFR it is left out, and a merge keeps the last one)."""
    out: dict[str, Any] = {}
    for variant in variants:
        rows: dict[str, Any] = {}
        erm: list[dict[str, Any]] = []
        for label, files, overrides in METHODS:
            if methods and label not in methods:
                continue
            configs = config_with(files, slug(label), overrides, runs / "configs")
            befores, row = _method_runs(label, configs, variant, seeds, extra, runs, resume, finished_only)
            if label == "DFR":
                erm = befores
            rows[label] = row
        ran_erm = not methods or "DFR" in methods
        erm_row = (
            {"ERM": {"after": summarise(erm), "per_seed_wga": [b["wga"] for b in erm]}} if ran_erm else {}
        )
        out[variant] = {**erm_row, **rows}
    return out


def _method_runs(
    label: str,
    configs: list[str],
    variant: str,
    seeds: list[int],
    extra: list[str],
    runs: Path,
    resume: bool,
    finished_only: bool,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One method's seeds on one variant: the reports before its stage, and its row."""
    reports, befores, sscores, seconds, failures, not_run = [], [], [], [], {}, []
    name = f"{variant}_{slug(label)}"
    for seed in seeds:
        try:
            report, before, sscore, sec = run(
                configs,
                seed,
                runs / name,
                ["--data.spurious", variant, *extra],
                reuse=resume or finished_only,
                run_missing=not finished_only,
            )
        except NotRun:
            not_run.append(seed)
            continue
        except Exception as error:  # one broken run must not lose the hours of the others
            failures[seed] = f"{type(error).__name__}: {error}"
            print(f"[quality] {variant} {label} seed {seed}: FAILED {failures[seed]}", flush=True)
            continue
        reports.append(report)
        befores.append(before)
        sscores.append(sscore)
        seconds.append(sec)
        print(f"[quality] {variant} {label} seed {seed}: wga {report['wga']:.3f} ({sec:.0f} s)", flush=True)
    row = {
        "after": summarise(reports),
        "before": summarise([b for b in befores if b]) if befores and all(befores) else None,
        "sscore": [s["mean"] for s in sscores if s] or None,
        "wall_s": seconds,
        "per_seed_wga": [r["wga"] for r in reports],
        "mining": [r["mining"] for r in reports if r.get("mining")] or None,
        "failed": failures,
        "not_run": not_run,
    }
    return befores, row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="seed 0, background variant, 1500 training images"
    )
    parser.add_argument(
        "--parts", default=",".join(PARTS), help="a subset keeps the other parts of the last JSON"
    )
    parser.add_argument(
        "--precision",
        default="auto",
        help="trainer precision of the quality and scaling runs; auto: bf16-mixed on a CUDA GPU with "
        "bf16, else 32-true (attribution always runs in float32)",
    )
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--variants", nargs="+")
    parser.add_argument(
        "--methods", nargs="+", help="quality: these rows only (merged into the last JSON's rows)"
    )
    parser.add_argument("--runs", default="runs/suite", help="where the runs' logs go")
    parser.add_argument("--n-train", type=int, help="training images per run (default 3000; --quick 1500)")
    parser.add_argument("--extra", default="", help="more CLI arguments for the quality runs, one string")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="quality: read the runs a killed suite finished (the same resolved configuration) instead of "
        "rerunning them",
    )
    parser.add_argument(
        "--finished-only",
        action="store_true",
        help="quality: read the runs that finished, run none (the others are listed as not run)",
    )
    parser.add_argument(
        "--render-only", action="store_true", help="rewrite the docs from the last JSON, run nothing"
    )


def main(args: argparse.Namespace) -> None:
    parts = set(args.parts.split(","))
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    variants = args.variants or (["background"] if args.quick else ["background", "patch", "both"])
    n_train = args.n_train or (1500 if args.quick else None)
    precision = resolve_precision(args.precision)
    precision_args = [] if precision == "32-true" else ["--trainer.precision", precision]
    extra = (["--data.n_train", str(n_train)] if n_train else []) + precision_args + shlex.split(args.extra)
    name = "suite_quick" if args.quick else "suite"
    command = "make bench-quick" if args.quick else "make bench"
    if args.render_only:
        render(json.loads((RESULTS / f"{name}.json").read_text()), command)
        return
    runs = (ROOT / args.runs / name).resolve()
    last = RESULTS / f"{name}.json"
    labels = [label for label, _, _ in METHODS]
    unknown = sorted(set(args.methods or ()) - set(labels))
    if unknown:
        raise SystemExit(f"--methods: no method named {unknown}; they are {labels}")
    partial = parts != set(PARTS) or args.variants or args.methods
    result: dict[str, Any] = json.loads(last.read_text()) if partial and last.is_file() else {}
    result.update(
        name=name, seeds=seeds, extra=" ".join(extra), precision=precision, environment=environment()
    )
    start = time.perf_counter()
    if "quality" in parts:
        measured = quality(seeds, variants, extra, runs, args.resume, args.finished_only, args.methods)
        # --variants / --methods name a subset: the other variants and rows of the last JSON are kept
        kept = result.get("quality", {}) if args.variants or args.methods else {}
        result["quality"] = {**kept, **{v: {**kept.get(v, {}), **rows} for v, rows in measured.items()}}
    found = sorted(runs.glob(f"{variants[0]}_DFR/*/seed{seeds[0]}/checkpoints/last.ckpt"))
    checkpoint = found[0] if found else None
    if parts & {"scaling", "ddp"} and checkpoint is None:
        print(
            f"[suite] no ERM checkpoint under {runs}/{variants[0]}_DFR: scaling and ddp need the quality part "
            f"of the {variants[0]} variant first (it keeps its checkpoints); skipped",
            flush=True,
        )
    if "speed" in parts:
        result["speed"] = speed(args.quick)
    if "scaling" in parts and checkpoint is not None:
        base = max(100, (n_train or 3000) // 6) if args.quick or args.n_train else 1500
        result["scaling"] = scaling(str(checkpoint), base, runs, precision_args)
    if "ddp" in parts and checkpoint is not None:
        result["ddp"] = ddp(str(checkpoint), runs)
    result.setdefault("wall_s", {})[",".join(sorted(parts))] = time.perf_counter() - start
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    render(result, command)
    minutes = (time.perf_counter() - start) / 60
    print(
        f"\n{name}: {minutes:.1f} min; wrote {DOC.relative_to(ROOT)} and {plot_path(name).relative_to(ROOT)}"
    )
