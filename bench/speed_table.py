"""The speed table of docs/results.md: one row (what, measured, ratio, target) per figure of bench/speed.py."""

from __future__ import annotations

from typing import Any

Row = tuple[str, str, str, str]


def speed_rows(speed_results: dict[str, Any]) -> list[Row]:
    """(what, measured, ratio, target) per speed figure, in the order of the speed JSON files."""
    rows: list[Row] = []
    for name, value in speed_results.items():
        for r in value if isinstance(value, list) else [value]:
            rows += _rows(name, r)
    return rows


def _rows(name: str, r: dict[str, Any]) -> list[Row]:
    if "step_ratio" in r:  # SCORE reports two ratios
        return [
            (
                "SCORE regularized epoch / ERM epoch",
                f"{r['regularized_epoch_s']:.1f} s / {r['erm_epoch_s']:.1f} s",
                f"{r['step_ratio']:.2f}",
                r["step_target"],
            ),
            (
                "SCORE mining (2 x 100) / ERM epoch",
                f"{r['mining_s']:.1f} s / {r['erm_epoch_full_train_s']:.1f} s",
                f"{r['mining_ratio']:.2f}",
                "<= 1",
            ),
        ]
    if "speedup" in r:
        what = f"s-score, {r['neurons']} neurons: captum loop / ours"
        return [(what, f"{r['captum_s']:.1f} s / {r['ours_s']:.2f} s", f"{r['speedup']:.0f}x", r["target"])]
    if "lrp_img_per_s" in r:
        what = (
            "AttnLRP / forward throughput" if name.startswith("speed_attnlrp") else "LRP / forward throughput"
        )
        measured = f"{r['lrp_img_per_s']:.1f} / {r['forward_img_per_s']:.1f} img/s"
        return [
            (f"{what} ({r['backbone']}, {r['image_size']} px)", measured, f"{r['ratio']:.2f}", r["target"])
        ]
    if "mask_step_s" in r:
        what = f"PruSC mask step / ERM step ({r['image_size']} px, batch {r['batch']})"
        measured = f"{1000 * r['mask_step_s']:.0f} / {1000 * r['erm_step_s']:.0f} ms"
        return [(what, measured, f"{r['ratio']:.2f}", r["target"])]
    if "refit_s" in r:
        return _refit_rows(r)
    if "groupdro_ratio" in r:
        rows = []
        for label, key in (("GroupDRO", "groupdro"), ("JTT", "jtt")):
            measured = f"{r[key + '_epoch_s']:.2f} s / {r['erm_epoch_s']:.2f} s"
            rows.append((f"{label} epoch / ERM epoch", measured, f"{r[key + '_ratio']:.3f}", r["target"]))
        measured = f"{r['jtt_identify_s']:.2f} s / {r['erm_epoch_s']:.2f} s"
        return [
            *rows,
            ("JTT identification pass / ERM epoch", measured, f"{r['jtt_identify_ratio']:.2f}", "(once)"),
        ]
    if "lightning_s" in r:
        measured = f"{r['lightning_s']:.2f} s / {r['plain_s']:.2f} s"
        return [("ERM epoch: Lightning / plain loop", measured, f"{r['ratio']:.3f}", r["target"])]
    return []


def _refit_rows(r: dict[str, Any]) -> list[Row]:
    """DFR's refit in processes and in one, and AFR's refit, each against an ERM epoch."""
    epoch = f"{r['erm_epoch_s']:.1f} s"
    workers = f", {r['workers']} processes" if "workers" in r else ""
    rows = [
        (
            "DFR refit / ERM epoch" + workers,
            f"{r['refit_s']:.2f} s / {epoch}",
            f"{r['ratio']:.3f}",
            r["target"],
        )
    ]
    if "sequential_refit_s" in r:
        measured = f"{r['sequential_refit_s']:.2f} s / {epoch}"
        rows.append(
            ("DFR refit / ERM epoch, one process", measured, f"{r['sequential_ratio']:.3f}", "(baseline)")
        )
    if "afr_refit_s" in r:
        what = "AFR refit (gamma x L2 grid, 2 folds) / ERM epoch"
        rows.append((what, f"{r['afr_refit_s']:.2f} s / {epoch}", f"{r['afr_ratio']:.3f}", r["afr_target"]))
    return rows
