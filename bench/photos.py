"""The pretrained regime: ImageNet efficientnet_lite0 on the real-photo benchmark, every stage.

    python -m bench photos            # make bench-photos: 3 seeds, every row, resnet18 from scratch for contrast
    python -m bench photos --quick    # make bench-photos-quick: seed 0, ERM + DFR + SCORE (auto)
    python -m bench photos --resume   # after a kill: finished runs are read, not rerun

The data is ``make photos``'s folder (built here when missing, seed 0). For each model seed: ERM from ImageNet
(configs/photos/erm.yaml), then every stage from that ERM's best checkpoint (by ``val/mean``, no group labels)
through its own file of configs/photos/ on top of erm.yaml, with the stage starting at epoch 0
(bench/photo_rows.py):

- DFR (group labels on val), and a plain scikit-learn reference refit on the same embeddings (group-balanced
  logistic regression on val) computed here;
- PruSC (masks only; the dense model is a candidate of its validation rule, ``keep_dense``), and the same with
  the mask epochs only (``keep_dense: false``); PruSC with its fine-tuning step on clusters found in each class
  at ``net.blocks.4`` (prusc_finetune.yaml); SCORE auto and oracle, s-score pruning;
- the baselines: AFR from the ERM checkpoint, GroupDRO (train groups, 3 epochs) and JTT from ImageNet, JTT's
  identification model early-stopped after 1 epoch;
- controls: ERM continued for the stages' epochs, ERM with its BatchNorm statistics re-estimated on the
  unaugmented train images (bn_recalibration.yaml, no training), and retraining on val without pruning
  (``--data.train_split val``, class labels only).

resnet18 from scratch gets ERM and DFR on the same data. Writes bench/results/photos[_quick].json and the
``<!-- photos -->`` section of docs/results.md (and, full run only, the README's photo table).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bench import RESULTS
from bench.docs_sections import DOC, README, write_between
from bench.environment import environment, resolve_precision
from bench.photo_rows import QUICK_ROWS, SCRATCH_ROWS, best_checkpoint, stage_rows
from bench.photos_report import PER_SEED_KEYS, TABLE, markdown, section, summary
from bench.quality import NotRun, run
from bench.sklearn_reference import WEIGHTS, sklearn_reference
from bench.stage_configs import config_files, config_with

REFERENCE = "DFR (scikit-learn reference)"
VARIANTS = {"photos": "waterbirds", "photos_c100": "correlation100", "photos_patch": "patch"}  # shortcut-data


class _Model:
    """One model's runs: per row the per-seed reports, wall seconds and failures."""

    def __init__(
        self, label: str, backbone_args: list[str], rows: tuple[str, ...], data: list[str], dataset: str
    ) -> None:
        self.label, self.backbone_args, self.rows, self.dataset = label, backbone_args, rows, dataset
        self.args = [*data, *backbone_args]
        # the benchmark's runs keep their folders; a regime's go beside them
        self.slug = label.split()[0] if dataset == "photos" else f"{dataset}_{label.split()[0]}"
        self.per_seed: dict[str, list[dict[str, Any]]] = {"ERM": [], **{r: [] for r in rows}, REFERENCE: []}
        self.failures: dict[str, dict[int, str]] = {}
        self.seconds: dict[str, list[float]] = {}

    def ran(self, row: str, seed: int, report: dict[str, Any], seconds: float) -> None:
        self.per_seed[row].append({**report, "seed": seed})
        self.seconds.setdefault(row, []).append(seconds)

    def result(self) -> dict[str, Any]:
        return {
            row: {
                "summary": summary(reports),
                "per_seed": [{k: r.get(k) for k in PER_SEED_KEYS} for r in reports],
                "wall_s": self.seconds.get(row, []),
                "failed": self.failures.get(row, {}),
            }
            for row, reports in self.per_seed.items()
        }


def one_model(
    label: str,
    backbone_args: list[str],
    rows: tuple[str, ...],
    seeds: list[int],
    root: Path,
    image_size: int,
    runs: Path,
    resume: bool,
    precision: list[str],
    finished_only: bool = False,
    dataset: str = "photos",
) -> dict[str, Any]:
    """ERM and the ``rows`` for every seed; per row: summaries, per-seed reports, wall seconds, failures."""
    model = _Model(
        label,
        backbone_args,
        rows,
        ["--data.root", str(root), "--data.image_size", str(image_size), *precision],
        dataset,
    )
    reuse = {"reuse": resume or finished_only, "run_missing": not finished_only, "data_seed": False}
    for seed in seeds:
        try:
            report, _, _, sec = run(
                config_files(dataset), seed, runs / f"{model.slug}_ERM", model.args, **reuse
            )
        except NotRun:  # --finished-only: a seed whose ERM has not finished has no rows yet
            for row in ("ERM", *rows):
                model.failures.setdefault(row, {})[seed] = "not run"
            continue
        model.ran("ERM", seed, report, sec)
        erm_dir = next((runs / f"{model.slug}_ERM").glob(f"*/seed{seed}"))
        ckpt = best_checkpoint(erm_dir)
        print(
            f"[photos] {label} ERM seed {seed}: wga {report['wga']:.3f} mean {report['mean']:.3f} ({sec:.0f} s)",
            flush=True,
        )
        _stage_rows(model, seed, ckpt, runs, reuse)
        if "DFR" in rows:
            _reference(model, seed, ckpt, erm_dir, root, image_size, resume or finished_only)
    return model.result()


def _stage_rows(model: _Model, seed: int, ckpt: str, runs: Path, reuse: dict[str, bool]) -> None:
    """The model's rows of one seed, each from the ERM checkpoint ``ckpt``."""
    for row, (files, overrides, top, extra) in stage_rows(ckpt, model.dataset).items():
        if row not in model.rows:
            continue
        name = f"{model.slug}_{row.replace(' ', '_').replace('(', '').replace(')', '').replace(':', '')}"
        configs = config_with(files, f"{name}_seed{seed}", overrides, runs / "configs", **top)
        try:
            report, before, sscore, sec = run(configs, seed, runs / name, [*model.args, *extra], **reuse)
        except NotRun:
            model.failures.setdefault(row, {})[seed] = "not run"
            continue
        except Exception as error:  # one broken run must not lose the others
            model.failures.setdefault(row, {})[seed] = f"{type(error).__name__}: {error}"
            print(f"[photos] {model.label} {row} seed {seed}: FAILED {error}", flush=True)
            continue
        if sscore:
            report["sscore"] = sscore
        if before:
            report["before"] = before
        model.ran(row, seed, report, sec)
        print(
            f"[photos] {model.label} {row} seed {seed}: wga {report['wga']:.3f} mean {report['mean']:.3f} "
            f"({sec:.0f} s)",
            flush=True,
        )


def _reference(
    model: _Model, seed: int, ckpt: str, erm_dir: Path, root: Path, image_size: int, reuse: bool
) -> None:
    """DFR's scikit-learn reference on the ERM checkpoint, computed once per ERM run (read back when reused)."""
    start = time.perf_counter()
    args = model.backbone_args
    backbone = args[args.index("--model.backbone") + 1] if args else "efficientnet_lite0"
    cached = erm_dir / "sklearn_reference.json"
    reference = json.loads(cached.read_text()) if cached.is_file() and reuse else {}
    if reference.get("weights") != WEIGHTS:  # absent, or computed with the old 1 / count weights
        reference = sklearn_reference(ckpt, backbone, root, image_size)
        cached.write_text(json.dumps(reference))
    model.ran(REFERENCE, seed, reference, time.perf_counter() - start)
    print(f"[photos] {model.label} DFR sklearn reference seed {seed}: wga {reference['wga']:.3f}", flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="seed 0, ERM + DFR + SCORE (auto), no resnet18")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument(
        "--dataset",
        default="photos",
        choices=("photos", "photos_c100", "photos_patch"),
        help="the configs/<dataset>/ folder: the benchmark, or its 100%%-correlation or colour-patch regime",
    )
    parser.add_argument("--root", default=None, help="the built benchmark (default data/<dataset>)")
    parser.add_argument("--image-size", type=int, default=None, help="default 128 on a CPU, 224 on a GPU")
    parser.add_argument("--runs", default="runs/bench_photos")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--no-docs", action="store_true", help="write the JSON only")
    parser.add_argument(
        "--finished-only", action="store_true", help="tables of the finished runs; run nothing"
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        help="run these rows only (with ERM); writes bench/results/<dataset>_rows.json and that section of "
        "docs/results.md",
    )
    parser.add_argument(
        "--no-scratch", action="store_true", help="leave out the resnet18-from-scratch contrast"
    )
    parser.add_argument(
        "--scratch-seeds",
        type=int,
        nargs="+",
        help="model seeds of the resnet18-from-scratch contrast (default: --seeds; about 3.5 min a seed on 2 idle "
        "cores, ERM and DFR)",
    )


def main(args: argparse.Namespace) -> None:
    import torch

    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    image_size = args.image_size or (224 if torch.cuda.is_available() else 128)
    root = Path(args.root or f"data/{args.dataset}")
    if not (root / "metadata.csv").is_file():
        from shortcut_lightning.data.photos import build_photos

        build_photos(root, seed=0, variant=VARIANTS[args.dataset])
    precision = ["--trainer.precision", resolve_precision(args.precision)]
    # shared by the quick and the full run: with --resume the full run reads the quick one's runs
    runs = Path(args.runs) / f"{image_size}px"
    start = time.perf_counter()
    all_rows = tuple(stage_rows("", args.dataset).keys())
    unknown = sorted(set(args.rows or ()) - set(all_rows))
    if unknown:
        raise SystemExit(f"--rows: no row named {unknown}; the rows are {list(all_rows)}")
    rows = tuple(args.rows or (QUICK_ROWS if args.quick else all_rows))
    models = {"efficientnet_lite0 (ImageNet)": ([], rows, seeds)}
    if not args.quick and not args.no_scratch and not args.rows:
        scratch = ["--model.backbone", "resnet18", "--model.weights", "null"]
        models["resnet18 (from scratch)"] = (scratch, SCRATCH_ROWS, args.scratch_seeds or seeds)
    result: dict[str, Any] = {
        "seeds": seeds,
        "image_size": image_size,
        "quick": args.quick,
        "environment": environment(),
        "models": {},
        "model_seeds": {label: m[2] for label, m in models.items()},
    }
    name = "photos_rows" if args.rows else "photos_quick" if args.quick else "photos"
    if args.dataset != "photos":
        name = name.replace("photos", args.dataset, 1)
    for label, (backbone_args, model_rows, model_seeds) in models.items():
        found = one_model(
            label,
            backbone_args,
            model_rows,
            model_seeds,
            root,
            image_size,
            runs,
            args.resume,
            precision,
            args.finished_only,
            args.dataset,
        )
        result["models"][label] = found
        result["wall_s"] = time.perf_counter() - start
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    command = "make bench-photos-quick" if args.quick else "make bench-photos"
    if args.rows or args.dataset != "photos":  # what was run, as typed
        command = shlex.join(["python", "-m", "bench", "photos", *sys.argv[2:]])
    text = markdown(result, command)
    print(text)
    if not args.no_docs:  # its own section of docs/results.md: the table, a regime's, a --rows run's
        start_marker, end_marker = section(name)
        write_between(DOC, start_marker, end_marker, f"{start_marker}\n\n{text}\n{end_marker}")
        if name == "photos":
            write_between(README, *TABLE, f"{TABLE[0]}\n\n{text}\n{TABLE[1]}")
