"""bench/sscore_shift.py: the split of an s-score change into broader maps and a shift at equal breadth."""

from __future__ import annotations

import csv
import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def sscore_shift():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("sscore_shift")
    finally:
        sys.path.remove(str(BENCH))


def _write(folder: Path, scores: list[float], shares: list[float]) -> None:
    folder.mkdir(parents=True)
    with (folder / "sscore.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["neuron", "s_score", "focus_share", "head_weight_norm"])
        for i, (s, f) in enumerate(zip(scores, shares, strict=True)):
            writer.writerow([i, s, f, 1.0])
    (folder / "sscore.json").write_text(json.dumps({"uniform_map_score": 0.9}))


def test_the_change_splits_into_broader_maps_and_the_intercept(sscore_shift, tmp_path):
    before_s, before_f = [0.2, 0.4, 0.6, 0.5], [0.1, 0.2, 0.3, 0.2]
    growth = [0.0, 0.1, 0.2, 0.3]
    after_f = [f + g for f, g in zip(before_f, growth, strict=True)]
    after_s = [s + 0.05 + 0.5 * g for s, g in zip(before_s, growth, strict=True)]  # intercept 0.05, slope 0.5
    _write(tmp_path / "run" / "sscore_before", before_s, before_f)
    _write(tmp_path / "run" / "sscore_after", after_s, after_f)
    line = sscore_shift.shift(tmp_path / "run")
    assert "change = +0.050 + 0.50 x focus change" in line
    assert "+0.075 from broader maps, +0.050 at an unchanged focus share" in line  # 0.5 x mean growth 0.15
    assert "uniform map 0.900" in line


def test_files_without_focus_shares_are_refused(sscore_shift, tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "sscore.csv").write_text("neuron,s_score,head_weight_norm\n0,0.5,1.0\n")
    with pytest.raises(SystemExit, match="no focus_share column"):
        sscore_shift.neurons(folder)
