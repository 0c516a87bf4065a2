"""bench/suite.py's report: the tables it writes say what the JSON holds, and only between their markers."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import yaml

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def suite():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("suite")
    finally:
        sys.path.remove(str(BENCH))


def _stat(mean: float, std: float = 0.0) -> dict:
    return {"mean": mean, "std": std}


def _result() -> dict:
    def row(wga: float, before: float | None, failed: dict | None = None) -> dict:
        keys = {
            "wga": _stat(wga, 0.01),
            "mean": _stat(0.9),
            "weighted_mean": _stat(0.95),
            "worst_class": _stat(0.8),
        }
        return {
            "after": keys,
            "before": {"wga": _stat(before)} if before is not None else None,
            "wall_s": [10.0, 12.0],
            "failed": failed or {},
        }

    quality = {
        "background": {"ERM": {"after": {"wga": _stat(0.6)}}, "DFR": row(0.93, 0.6), "PruSC": row(0.7, 0.55)},
        "patch": {
            "ERM": {"after": {"wga": _stat(0.5)}},
            "DFR": row(0.88, 0.5),
            "PruSC": row(0.52, 0.5, {2: "E"}),
        },
    }
    env = {"date": "2026-11-23", "machine": "x86_64, 2 threads", "gpu": "none", "python": "3.11.7",
           "torch": "2.14.1", "lightning": "2.6.6", "timm": "1.0.31", "zennit": "0.5.1"}  # fmt: skip
    return {"name": "suite", "seeds": [0, 1, 2], "extra": "", "precision": "32-true", "environment": env,
            "quality": quality}  # fmt: skip


def test_results_table_reports_each_method_gain_and_failures(suite):
    text = suite.markdown(_result(), "make bench")
    assert text.startswith(suite.START) and text.endswith(suite.END)
    pruning = next(line for line in text.splitlines() if line.startswith("| PruSC") and "0.520" in line)
    assert "+0.020" in pruning  # WGA gain over the run's own ERM
    assert "| DFR | val groups | 0.930 ± 0.010 |" in text and "+0.330" in text
    assert "| PruSC | none |" in text and "train-weighted mean: the group accuracies weighted" in text
    assert "Failed runs (left out of the means; errors in the JSON): PruSC seed 2." in text
    assert "precision 32-true" in text


def test_readme_table_has_a_column_pair_per_variant(suite):
    text = suite.readme_table(_result())
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert header.count("worst-group") == 2
    assert "| DFR | val groups | 0.930 ± 0.010 (+0.330) | 0.900 | 0.880 ± 0.010 (+0.380) | 0.900 |" in text
    assert "1 run(s) had not finished or failed" in text  # PruSC seed 2 of the patch variant
    assert "| ERM | none | 0.600 ± 0.000 | n/a | 0.500 ± 0.000 | n/a |" in text
    assert "mean: the accuracy over all test samples (the sample mean)" in text


def test_write_between_replaces_only_the_marked_part(suite, tmp_path):
    path = tmp_path / "README.md"
    path.write_text(f"# Title\n\nintro\n{suite.TABLE_START}\nold\n{suite.TABLE_END}\n\nrest\n")
    suite.write_between(
        path, suite.TABLE_START, suite.TABLE_END, f"{suite.TABLE_START}\nnew\n{suite.TABLE_END}"
    )
    assert path.read_text() == f"# Title\n\nintro\n{suite.TABLE_START}\nnew\n{suite.TABLE_END}\n\nrest\n"


def test_a_finished_run_is_reused_only_with_the_same_arguments_and_config(suite, tmp_path, monkeypatch):
    """How a killed suite resumes: a run with a record of its arguments and config is read, not rerun;
    a changed argument or config text reruns it."""
    import json

    quality = sys.modules["quality"]
    config = tmp_path / "stage.yaml"
    config.write_text("trainer: {max_epochs: 2}\n")
    calls = []

    def fake_cli(args):  # stands in for `shortcut fit`: writes what a finished run leaves
        calls.append(args)
        run_dir = Path(args[args.index("--trainer.logger.init_args.save_dir") + 1]) / "stage" / "seed0"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").write_text(json.dumps({"wga": 0.1 * len(calls)}))

    monkeypatch.setattr(quality, "cli_main", fake_cli)
    first = quality.run(str(config), 0, tmp_path / "runs", ["--a", "1"], reuse=True)
    again = quality.run(str(config), 0, tmp_path / "runs", ["--a", "1"], reuse=True)
    assert len(calls) == 1 and again[0] == first[0] and again[3] == first[3]
    quality.run(str(config), 0, tmp_path / "runs", ["--a", "2"], reuse=True)
    assert len(calls) == 2
    config.write_text("# a comment does not change the run\ntrainer: {max_epochs: 2}\n")
    quality.run(str(config), 0, tmp_path / "runs", ["--a", "2"], reuse=True)
    assert len(calls) == 2
    config.write_text("trainer: {max_epochs: 3}\n")
    changed = quality.run(str(config), 0, tmp_path / "runs", ["--a", "2"], reuse=True)
    assert len(calls) == 3 and changed[0]["wga"] == pytest.approx(0.3)
    quality.run(str(config), 0, tmp_path / "runs", ["--a", "2"], reuse=False)
    assert len(calls) == 4  # without reuse every run is fresh


def test_the_quick_suite_keeps_its_own_section_and_figure(suite, tmp_path):
    quick = {**_result(), "name": "suite_quick"}
    text = suite.markdown(quick, "make bench-quick")
    start, end = suite.markers("suite_quick")
    assert text.startswith(start) and text.endswith(end) and suite.START not in text
    doc = tmp_path / "results.md"
    doc.write_text(f"# Results\n\n{suite.START}\nfull\n{suite.END}\n\nhand-written\n")
    suite.write_between(doc, start, end, text)
    assert f"{suite.START}\nfull\n{suite.END}" in doc.read_text()  # the full suite's section is kept
    assert suite.plot_path("suite").name == "results.png"
    assert suite.plot_path("suite_quick").name == "results_quick.png"


def test_mining_quality_is_averaged_over_seeds_per_class(suite):
    result = _result()
    seeds = [
        {"slash": {"selected": 10, "lrp_mask_overlap_with_spurious_region": 0.8, "precision_vs_oracle": 1.0}},
        {"slash": {"selected": 6, "lrp_mask_overlap_with_spurious_region": 0.6, "precision_vs_oracle": 0.5}},
    ]
    result["quality"]["background"]["SCORE (auto)"] = {
        **result["quality"]["background"]["DFR"],
        "mining": seeds,
    }
    text = suite.markdown(result, "make bench")
    assert "| background | SCORE (auto) | slash | 8.00 | 0.70 | 0.75 |" in text
    assert "| background | DFR |" not in text.split("SCORE mining quality", 1)[1]


def test_runs_not_finished_are_listed_and_drawn_without_a_bar(suite, monkeypatch, tmp_path):
    result = _result()
    result["quality"]["patch"]["PruSC"] = {
        "after": {},
        "before": None,
        "wall_s": [],
        "failed": {},
        "not_run": [0, 1],
    }
    text = suite.markdown(result, "make bench")
    assert "Not run yet (left out of the means): PruSC seed 0, PruSC seed 1." in text
    monkeypatch.setattr(suite, "plot_path", lambda name: tmp_path / "plot.png")
    suite.plot(result)
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_a_run_the_cli_refuses_is_an_error_not_the_end_of_the_suite(suite, tmp_path, monkeypatch):
    """The CLI exits 2 on our input errors (e.g. SCORE's oracle finding nothing): SystemExit would end
    the whole suite, so the runner turns it into an exception the suite records as a failed run."""
    quality = sys.modules["quality"]
    config = tmp_path / "stage.yaml"
    config.write_text("trainer: {max_epochs: 2}\n")

    def refusing_cli(args):
        raise SystemExit(2)

    monkeypatch.setattr(quality, "cli_main", refusing_cli)
    with pytest.raises(RuntimeError, match="exited with status 2"):
        quality.run(str(config), 0, tmp_path / "runs", [])


def test_quality_runs_only_the_methods_named_and_leaves_the_erm_row_to_dfr(suite, tmp_path, monkeypatch):
    """``--methods AFR``: one row is run per seed, and no ERM row is written (the merge keeps the last one)."""
    ran = []

    def fake_run(config, seed, save_dir, extra, **kwargs):
        ran.append((Path(save_dir).name, seed))
        report = {"wga": 0.5, "mean": 0.9, "weighted_mean": 0.9, "worst_class": 0.8, "balanced": 0.85}
        return report, {**report, "wga": 0.4}, None, 1.0

    monkeypatch.setattr(suite, "run", fake_run)
    out = suite.quality([0, 1], ["background"], [], tmp_path, methods=["AFR"])
    assert ran == [("background_AFR", 0), ("background_AFR", 1)]
    assert list(out["background"]) == ["AFR"] and out["background"]["AFR"]["per_seed_wga"] == [0.5, 0.5]
    full = suite.quality([0], ["background"], [], tmp_path, methods=["DFR", "AFR"])
    assert list(full["background"]) == ["ERM", "DFR", "AFR"]
    assert full["background"]["ERM"]["per_seed_wga"] == [0.4]  # DFR's "before": the ERM of its run


def test_embedded_variants_parse_settings_and_read_the_tested_checkpoints_score(suite, tmp_path):
    import torch

    variants, quality = importlib.import_module("embedded_variants"), importlib.import_module("quality")
    assert variants.overrides(["GroupDRO.step_size=0.1", "GroupDRO.adjustment=2"]) == {
        "GroupDRO": {"step_size": 0.1, "adjustment": 2}
    }
    with pytest.raises(SystemExit, match=r"Class\.argument=value"):
        variants.overrides(["step_size=0.1"])
    assert quality.selected_by(tmp_path) == (None, None)  # no last.ckpt: no monitor chose
    (tmp_path / "checkpoints").mkdir()
    state = {
        "BestAndLastCheckpoint{'monitor': 'val/worst_class'}": {
            "monitor": "val/worst_class",
            "best_model_score": torch.tensor(0.75),
        }
    }
    torch.save({"callbacks": {"GroupDRO": {}, **state}}, tmp_path / "checkpoints" / "last.ckpt")
    assert quality.selected_by(tmp_path) == ("val/worst_class", 0.75)
    # the model the CLI tested: the monitor's best; a stage that changes the model at fit end, what it left
    best = tmp_path / "checkpoints" / "epoch001.ckpt"
    state[next(iter(state))]["best_model_path"] = str(best)
    torch.save({"callbacks": state}, tmp_path / "checkpoints" / "last.ckpt")
    best.write_bytes(b"")
    config = {"trainer": {"callbacks": [{"class_path": "shortcut_lightning.callbacks.GroupDRO"}]}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert quality.tested_checkpoint(tmp_path) == best
    config["trainer"]["callbacks"][0]["class_path"] = "shortcut_lightning.callbacks.NeuronRegularization"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert quality.tested_checkpoint(tmp_path).name == "last.ckpt"  # SCORE tests its fine-tuned model
    config["trainer"]["callbacks"][0]["class_path"] = "shortcut_lightning.callbacks.DeepFeatureReweighting"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "checkpoints" / "dfr.ckpt").write_bytes(b"")
    assert quality.tested_checkpoint(tmp_path).name == "dfr.ckpt"


def test_every_photo_row_says_how_much_group_information_it_uses(suite):
    photos = importlib.import_module("photos")
    rows = [*photos.stage_rows("erm.ckpt"), "ERM", "DFR (scikit-learn reference)"]
    assert [row for row in rows if row not in suite.GROUP_INFO] == []
