"""The rank-0 decisions at CelebA scale: seconds and peak memory of each stage's decision step (not part of CI).

Under DDP every stage embeds its split on all ranks and then decides on rank 0 while the other ranks wait
at a broadcast (``stages.decide_on_rank_zero``). This bench times those decisions alone, on synthetic
embeddings the size of CelebA's (162,770 training images, 2048-d ResNet-50 embeddings), so that a user
knows what rank 0 costs before a 4-GPU run:

- ``dfr``: ``fit_dfr`` (C tuning + 20 group-balanced refits; the refit split is the n embeddings and the
  scaler is fit on the same), its fits in one process per core as the callback's default;
- ``afr``: ``fit_afr`` with its default (gamma, L2) grid, cross-fitted on 2 folds, then the final fit;
- ``kmeans``: PruSC's ``cosine_kmeans`` with 16 clusters, as ``cluster_by_index`` calls it;
- ``jtt``: JTT's ``error_set``;
- ``score``: SCORE's ``top_by_logit`` for each class (top m = 100).

The embeddings are float32 with CelebA-like groups (class x spurious attribute, shares 0.44, 0.41, 0.14,
0.01), a class direction, a stronger spurious direction and noise; the logits are those of an "ERM" head
that leans on the spurious direction, so the minority group is mostly misclassified, as in CelebA.

Each (step, n) runs in a fresh subprocess; its peak RSS (``os.wait4``'s ``ru_maxrss``: the child and the
fit workers it waited for) is recorded beside that of an idle subprocess that imports the same modules
(``baseline_mb``) and the size of the synthetic inputs (``data_mb``). The imports peak above where they
settle, so the child also measures the step alone: it resets its RSS high-water mark after making the
inputs (``/proc/self/clear_refs``) and records how far the step raised it in that process (``step_mb``;
the forked fit workers of DFR and AFR count in ``peak_mb`` only). Targets: at the largest n every step within 60 s, and a cost that
grows at most linearly (largest n at most 1.25 x the size ratio of the smallest n: 20 x for 160k / 10k).

    python -m bench scale --sizes 10000 50000 160000 --dim 2048 --out bench/results/scale_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import ROOT
from bench.docs_sections import publish
from bench.environment import environment

if TYPE_CHECKING:
    from torch import Tensor

STEPS = ("dfr", "afr", "kmeans", "jtt", "score")
SHARES = (
    0.44,
    0.41,
    0.14,
    0.01,
)  # CelebA: (not blond, female), (not blond, male), (blond, female), (blond, male)
SECONDS = 60.0
GROWTH = 1.25  # allowed excess over linear growth
MODES = 32  # sub-populations of the synthetic embeddings (0: isotropic noise only, k-means' worst case)


def synthetic(n: int, dim: int, seed: int = 0, modes: int = MODES) -> dict:
    """Float32 embeddings [n, dim] with CelebA-like groups, and the logits of an ERM head that uses the shortcut.

    A row is a positive mean (pooled post-ReLU features share one), one of ``modes`` sub-population offsets
    (what else the images differ in: pose, background, ...; 0: none, isotropic noise only), per-dimension
    noise, and a class and a stronger spurious signal along two directions. Blond goes with female in
    CelebA, so the ERM head reads ``class - 0.5 spurious`` and misclassifies most blond men.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    group = torch.multinomial(torch.tensor(SHARES), n, replacement=True, generator=gen)
    target, spurious = group // 2, group % 2
    mode = torch.randint(max(modes, 1), (n,), generator=gen)
    mean = torch.randn(dim, generator=gen).abs() * 0.5
    offsets = torch.randn(max(modes, 1), dim, generator=gen) * (8 / dim**0.5) * (modes > 0)
    noise_scale = (torch.rand(dim, generator=gen) + 0.5) * (0.25 if modes > 0 else 1.0)
    class_dir = torch.nn.functional.normalize(torch.randn(dim, generator=gen), dim=0)
    spurious_dir = torch.nn.functional.normalize(torch.randn(dim, generator=gen), dim=0)
    strength = 1.0 if modes > 0 else 4.0  # the signals against the noise along their directions
    x = torch.empty(n, dim)
    for start in range(0, n, 8192):  # in chunks: the inputs are the only large allocation
        rows = slice(start, min(n, start + 8192))
        sign_c = (2 * target[rows] - 1).float()[:, None]
        sign_a = (2 * spurious[rows] - 1).float()[:, None]
        noise = torch.randn(rows.stop - rows.start, dim, generator=gen) * noise_scale
        signal = strength * (0.5 * sign_c * class_dir + 0.8 * sign_a * spurious_dir)
        x[rows] = mean + offsets[mode[rows]] + noise + signal
    direction = class_dir - 0.5 * spurious_dir  # blond reads as female: the shortcut
    weight0 = torch.stack([-direction, direction]) * 2 / strength
    bias0 = torch.tensor([0.5, -0.5]) - weight0 @ mean  # a threshold that favours the larger class
    return {
        "x": x,
        "target": target,
        "group": group,
        "spurious": spurious,
        "logits": x @ weight0.T + bias0,
        "weight0": weight0,
        "bias0": bias0,
    }


def run_step(step: str, n: int, dim: int, modes: int = MODES) -> dict:
    """In the child: make the inputs, time the step once, return its figures."""
    import torch

    from shortcut_lightning.methods.dfr.afr_fit import fit_afr
    from shortcut_lightning.methods.dfr.last_layer import fit_dfr
    from shortcut_lightning.methods.jtt.just_train_twice import error_set
    from shortcut_lightning.methods.prusc.kmeans import cosine_kmeans
    from shortcut_lightning.methods.score.lrp_analysis import top_by_logit
    from shortcut_lightning.probing.embedding_pass import Embeddings

    if step == "idle":
        return {"seconds": 0.0, "data_mb": 0.0, "step_mb": 0.0}
    data = synthetic(n, dim, modes=modes)
    data_mb = sum(v.numel() * v.element_size() for v in data.values()) / 2**20
    x, y, g = data["x"], data["target"], data["group"]
    before = _reset_peak()
    start = time.perf_counter()
    if step == "dfr":
        head = fit_dfr(x.numpy(), y.numpy(), g.numpy(), x.numpy(), 2, workers=None)
        detail = {"c": head.c, "tuning_worst_accuracy": head.tuning}
    elif step == "afr":
        head = fit_afr(x, data["logits"], y, data["weight0"], data["bias0"], 2, workers=None)
        detail = {"chosen": head.chosen}
    elif step == "kmeans":
        found = cosine_kmeans(x, 16, seed=0)
        detail = {"inertia": found.inertia, "sizes": torch.bincount(found.labels, minlength=16).tolist()}
    elif step == "jtt":
        detail = {"errors": len(error_set(data["logits"], y))}
    elif step == "score":
        labels = {k: data[k] for k in ("target", "group", "spurious", "logits")}
        ranked = Embeddings(features=torch.empty(0, dim), index=torch.arange(n), **labels)
        detail = {"selected": sum(len(top_by_logit(ranked, c, own=True, n=100)) for c in (0, 1))}
    else:
        raise SystemExit(f"unknown step {step!r}: choose one of {', '.join(STEPS)}")
    seconds = time.perf_counter() - start
    memory = {"step_mb": _status_mb("VmHWM") - before if before is not None else None}
    if step in ("dfr", "afr"):
        detail["worst_group_accuracy"] = _worst_group(head, x, y, g)
    return {"seconds": seconds, "data_mb": data_mb, **memory, **detail}


def _status_mb(field: str) -> float:
    """A field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> float | None:
    """Resets this process's RSS high-water mark to its current RSS (Linux); returns that RSS in MiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_mb("VmRSS")
    except OSError:  # not Linux, or not allowed: only the whole child's peak is recorded
        return None


def _worst_group(head: Any, x: Tensor, y: Tensor, g: Tensor) -> float:
    """Worst-group accuracy of a fitted head on the inputs (a sanity check that the fit is realistic)."""
    import torch

    weight, bias = torch.as_tensor(head.weight).float(), torch.as_tensor(head.bias).float()
    pred = (x @ weight.T + bias).argmax(1)
    return min(float((pred[g == v] == y[g == v]).double().mean()) for v in g.unique())


def measure(step: str, n: int, dim: int, modes: int = MODES) -> dict:
    """The step in a fresh subprocess: its figures and its peak RSS in MiB."""
    command = [
        sys.executable,
        "-m",
        "bench",
        "scale",
        "--child",
        step,
        "--sizes",
        str(n),
        "--dim",
        str(dim),
        "--modes",
        str(modes),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert process.stdout is not None
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{step} at n={n} failed (exit {process.returncode})")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_mb": usage.ru_maxrss / 1024}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000, 160000])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    parser.add_argument("--modes", type=int, default=MODES, help="sub-populations (0: isotropic noise)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/scale_cpu.json"))
    parser.add_argument("--no-docs", action="store_true", help="write the JSON only, not docs/results.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> None:
    if args.child:
        print(json.dumps(run_step(args.child, args.sizes[0], args.dim, args.modes)))
        return
    baseline = measure("idle", 0, args.dim)["peak_mb"]
    print(f"idle subprocess (imports torch and the methods): {baseline:.0f} MB peak")
    rows, verdicts = [], {}
    for step in args.steps:
        for n in args.sizes:
            row = {"step": step, "n": n, "dim": args.dim, **measure(step, n, args.dim, args.modes)}
            if row["step_mb"] is None:  # no high-water reset here: the whole child less the idle one
                row["step_mb"] = row["peak_mb"] - baseline - row["data_mb"]
            rows.append(row)
            print(
                f"{step:7s} n={n:7d}: {row['seconds']:8.2f} s, peak {row['peak_mb']:7.0f} MB "
                f"(inputs {row['data_mb']:.0f} MB, step {row['step_mb']:.0f} MB)",
                flush=True,
            )
        mine = [r for r in rows if r["step"] == step]
        small, large = mine[0], mine[-1]
        allowed = GROWTH * large["n"] / small["n"]
        ratio = large["seconds"] / max(small["seconds"], 1e-3)
        verdicts[step] = {
            "seconds_at_largest": large["seconds"],
            "within_seconds": large["seconds"] <= SECONDS,
            "time_ratio": ratio,
            "memory_ratio": max(large["step_mb"], 1.0) / max(small["step_mb"], 1.0),
            "allowed_ratio": allowed,
            "at_most_linear": ratio <= allowed or large["seconds"] <= 1.0,  # sub-second: timer noise
        }
        v = verdicts[step]
        print(
            f"{step}: {v['seconds_at_largest']:.2f} s at n={large['n']} (target <= {SECONDS:.0f}: "
            f"{'met' if v['within_seconds'] else 'MISSED'}), {large['n']}/{small['n']} costs "
            f"{ratio:.1f}x (target <= {allowed:.0f}x: {'met' if v['at_most_linear'] else 'MISSED'})"
        )
    result = {
        "benchmark": "rank-0 decision steps at CelebA scale (synthetic float32 embeddings)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "baseline_mb": baseline,
        "modes": args.modes,
        "targets": {"seconds_at_largest": SECONDS, "growth": f"<= {GROWTH} x linear"},
        "rows": rows,
        "verdicts": verdicts,
    }
    publish(result, args.out, "scale", None if args.no_docs else markdown(result))


NAMES = {
    "dfr": "DFR's refits (C tuning + 20 group-balanced fits)",
    "afr": "AFR's fit ((gamma, L2) grid on 2 folds + the final fit)",
    "kmeans": "PruSC's k-means (16 clusters, float32)",
    "jtt": "JTT's error set",
    "score": "SCORE's top-m selection (m = 100 a class)",
}


def markdown(result: dict[str, Any]) -> str:
    """The section of docs/results.md: seconds and memory per step and n, and the two targets."""
    env = environment()
    sizes = sorted({r["n"] for r in result["rows"]})
    head = " | ".join(f"{n // 1000}k s" for n in sizes)
    lines = [
        f"`python -m bench scale` (run by `make bench`) on {env['date']} ({env['machine']}, GPU {env['gpu']}): "
        f"synthetic float32 embeddings, d = {result['rows'][0]['dim']}, CelebA-like groups. Memory: what the "
        "step adds to its process (MB; the forked fit workers of DFR and AFR count in the peak only), and the "
        f"whole process's peak (an idle one: {result['baseline_mb']:.0f} MB).",
        "",
        f"| decision step | {head} | step memory at {sizes[-1] // 1000}k | peak at {sizes[-1] // 1000}k | "
        f"{sizes[-1] // 1000}k / {sizes[0] // 1000}k time (target <= {GROWTH * sizes[-1] / sizes[0]:.0f}x) | "
        f"<= {SECONDS:.0f} s at {sizes[-1] // 1000}k |",
        "|---|" + "---|" * (len(sizes) + 4),
    ]
    for step, verdict in result["verdicts"].items():
        rows = {r["n"]: r for r in result["rows"] if r["step"] == step}
        times = " | ".join(f"{rows[n]['seconds']:.2f}" for n in sizes)
        last = rows[sizes[-1]]
        growth = f"{verdict['time_ratio']:.1f}x" + ("" if verdict["at_most_linear"] else " (missed)")
        within = "met" if verdict["within_seconds"] else "missed"
        lines.append(
            f"| {NAMES.get(step, step)} | {times} | {last['step_mb']:.0f} MB | {last['peak_mb']:.0f} MB | "
            f"{growth} | {within} |"
        )
    return "\n".join(lines) + "\n"
