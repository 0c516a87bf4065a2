"""SCORE settings from the full suite's ERM checkpoints (docs/results.md, "After the fix"); not part of CI.

    python bench/score_grid.py LOG 'JSON' ['JSON' ...]

Each JSON is one setting for ``bench/stage_from_checkpoint.py`` (its keys), run from the
``checkpoints/before_mining.ckpt`` of ``runs/suite/suite/{background,patch}_SCORE_auto``, seeds 0-2 (a
``make bench`` run leaves them there). ``"reuse": true`` takes that run's ``mining.json`` (the same
neurons, no mining). One line per setting and variant is appended to LOG: test worst-group accuracy per
seed, their mean, and the mean accuracy.
"""

import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "suite" / "suite"
VARIANTS = ("background", "patch")
SEEDS = (0, 1, 2)


def one(variant: str, seed: int, setting: dict, out: str) -> tuple[float, float] | None:
    """(test WGA, test mean) of one stage run, or None when it failed (its error goes to stderr)."""
    run = RUNS / f"{variant}_SCORE_auto" / "synthetic_score" / f"seed{seed}"
    cfg = {"seed": seed, **setting}
    if cfg.pop("reuse", False):
        cfg["mining_file"] = str(run / "mining.json")
    args = [sys.executable, "bench/stage_from_checkpoint.py", "score", str(run / "checkpoints" / "before_mining.ckpt"),
            variant, out, json.dumps(cfg)]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    found = re.search(r"wga ([\d.]+) mean ([\d.]+)", done.stdout)
    if found is None:
        print(f"{variant} seed {seed} {cfg}: FAILED\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return float(found.group(1)), float(found.group(2))


def main() -> None:
    log, settings = Path(sys.argv[1]), sys.argv[2:]
    for text in settings:
        setting = json.loads(text)
        for variant in VARIANTS:
            with tempfile.TemporaryDirectory() as out:
                results = [r for seed in SEEDS if (r := one(variant, seed, setting, out)) is not None]
            if not results:
                line = f"{text} | {variant} | every seed failed"
            else:
                wga = " / ".join(f"{w:.3f}" for w, _ in results)
                line = (f"{text} | {variant} | wga {wga}: {statistics.mean(w for w, _ in results):.3f} | "
                        f"mean {statistics.mean(m for _, m in results):.3f}")  # fmt: skip
            print(line, flush=True)
            with log.open("a") as file:
                file.write(line + "\n")


if __name__ == "__main__":
    main()
