"""s-scores of a run weighted by the ERM head and by the final (e.g. DFR) head (not part of CI).

    python bench/head_weighted_sscore.py RUN_DIR [RUN_DIR ...]

RUN_DIR is a run of a config with DFR and then ``SpuriousScore`` (e.g.
``configs/synthetic_vit_sscore_dfr.yaml``): ``sscore.csv`` holds every neuron's s-score, ``dfr_head.pt``
the refit head and ``checkpoints/last.ckpt`` the ERM head (saved before DFR ran). Every neuron's
s-score is the same for both heads; what changes is which neurons the head reads. Weights are the
head's absolute weights summed over classes, as ``sscore.json``'s ``head_weighted_mean``.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch


def weighted(scores: torch.Tensor, usage: torch.Tensor) -> tuple[float, float, int]:
    used = usage > 0
    return float((scores * usage).sum() / usage.sum()), float(scores[used].mean()), int(used.sum())


def main() -> None:
    print(
        "run | mean s-score | ERM: head-weighted, mean over read, read | final: head-weighted, mean over read, read"
    )
    for run in map(Path, sys.argv[1:]):
        rows = list(csv.DictReader((run / "sscore.csv").open()))
        scores = torch.tensor([float(r["s_score"]) for r in rows])
        final = torch.load(run / "dfr_head.pt", map_location="cpu")["weight"].abs().sum(0)
        state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
            "state_dict"
        ]
        head = next(v for k, v in state.items() if k.endswith("head.weight") or k.endswith("fc.weight"))
        erm = head.abs().sum(0)
        a, b = weighted(scores, erm), weighted(scores, final)
        print(
            f"{run} | {scores.mean():.3f} | {a[0]:.3f}, {a[1]:.3f}, {a[2]} | {b[0]:.3f}, {b[1]:.3f}, {b[2]}"
        )


if __name__ == "__main__":
    main()
