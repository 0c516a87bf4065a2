"""SCORE or PruSC settings from the full suite's ERM checkpoints (docs/results.md); not part of CI.

    python bench/stage_grid.py {score|prusc} LOG [--variants background,patch] 'JSON' ['JSON' ...]

Each JSON is one setting for ``bench/stage_from_checkpoint.py`` (its keys), run from the
``checkpoints/before_mining.ckpt`` of ``runs/suite/suite/<variant>_SCORE_auto``, seeds 0-2 (a
``make bench`` run leaves them there). That checkpoint is the model after the suite's 6 ERM epochs, the
same for every method of a seed (the suite's "ERM of the same run" column), so PruSC starts from it too.
``"reuse": true`` (SCORE) takes that run's ``mining.json`` (the same neurons, no mining). One line per
setting and variant is appended to LOG: test worst-group accuracy per seed, their mean, the mean
accuracy and, for PruSC with a ``monitor``, the mask-learning epoch whose masks were kept.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "suite" / "suite"
SEEDS = (0, 1, 2)


def one(stage: str, variant: str, seed: int, setting: dict, out: str) -> tuple[float, float, str] | None:
    """(test WGA, test mean, PruSC's best epoch or "") of one stage run, or None when it failed (its error
    goes to stderr)."""
    run = RUNS / f"{variant}_SCORE_auto" / "synthetic_score" / f"seed{seed}"
    cfg = {"seed": seed, **setting}
    if cfg.pop("reuse", False):
        cfg["mining_file"] = str(run / "mining.json")
    args = [sys.executable, "bench/stage_from_checkpoint.py", stage, str(run / "checkpoints" / "before_mining.ckpt"),
            variant, out, json.dumps(cfg)]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    found = re.search(r"wga ([\d.]+) mean ([\d.]+)", done.stdout)
    if found is None:
        print(f"{variant} seed {seed} {cfg}: FAILED\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    best = re.search(r"best epoch (\d+)", done.stdout)
    return float(found.group(1)), float(found.group(2)), best.group(1) if best else ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stage", choices=("score", "prusc"))
    parser.add_argument("log", type=Path)
    parser.add_argument("settings", nargs="+", help="one JSON object per setting")
    parser.add_argument(
        "--variants", default="background,patch", help="comma-separated: background, patch, both"
    )
    args = parser.parse_args()
    for text in args.settings:
        setting = json.loads(text)
        for variant in args.variants.split(","):
            with tempfile.TemporaryDirectory() as out:
                results = [
                    r for seed in SEEDS if (r := one(args.stage, variant, seed, setting, out)) is not None
                ]
            if not results:
                line = f"{args.stage} {text} | {variant} | every seed failed"
            else:
                wga = " / ".join(f"{w:.3f}" for w, _, _ in results)
                line = (f"{args.stage} {text} | {variant} | wga {wga}: {statistics.mean(w for w, _, _ in results):.3f} | "
                        f"mean {statistics.mean(m for _, m, _ in results):.3f}")  # fmt: skip
                if any(b for _, _, b in results):
                    line += " | best epochs " + " / ".join(b for _, _, b in results)
            print(line, flush=True)
            with args.log.open("a") as file:
                file.write(line + "\n")


if __name__ == "__main__":
    main()
