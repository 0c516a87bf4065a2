"""The bench package: the suite's report (the tables it writes say what the JSON holds, and only between their
markers), the run cache keyed on the resolved configuration, what a finished run's folder is read for, and the
one runner (every command imports and takes its options)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the bench package lives beside the library, not in it
    sys.path.insert(0, str(ROOT))

from bench import quality, run_files, suite, suite_report  # noqa: E402
from bench.docs_sections import write_between  # noqa: E402


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

    quality_rows = {
        "background": {"ERM": {"after": {"wga": _stat(0.6)}}, "DFR": row(0.93, 0.6), "PruSC": row(0.7, 0.55)},
        "patch": {
            "ERM": {"after": {"wga": _stat(0.5)}},
            "DFR": row(0.88, 0.5),
            "PruSC": row(0.52, 0.5, {2: "E"}),
        },
    }
    env = {
        "date": "2026-11-23",
        "machine": "x86_64, 2 threads",
        "gpu": "none",
        "python": "3.11.7",
        "torch": "2.14.1",
        "lightning": "2.6.6",
        "timm": "1.0.31",
        "zennit": "0.5.1",
    }
    return {
        "name": "suite",
        "seeds": [0, 1, 2],
        "extra": "",
        "precision": "32-true",
        "environment": env,
        "quality": quality_rows,
    }


def test_results_table_reports_each_method_gain_and_failures():
    text = suite_report.markdown(_result(), "make bench")
    assert text.startswith(suite_report.START) and text.endswith(suite_report.END)
    pruning = next(line for line in text.splitlines() if line.startswith("| PruSC") and "0.520" in line)
    assert "+0.020" in pruning  # WGA gain over the run's own ERM
    assert "| DFR | val groups | 0.930 ± 0.010 |" in text and "+0.330" in text
    assert "| PruSC | none |" in text and "train-weighted mean: the group accuracies weighted" in text
    assert "Failed runs (left out of the means; errors in the JSON): PruSC seed 2." in text
    assert "precision 32-true" in text


def test_readme_table_has_a_column_pair_per_variant():
    text = suite_report.readme_table(_result())
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert header.count("worst-group") == 2
    assert "| DFR | val groups | 0.930 ± 0.010 (+0.330) | 0.900 | 0.880 ± 0.010 (+0.380) | 0.900 |" in text
    assert "1 run(s) had not finished or failed" in text  # PruSC seed 2 of the patch variant
    assert "| ERM | none | 0.600 ± 0.000 | n/a | 0.500 ± 0.000 | n/a |" in text
    assert "mean: the accuracy over all test samples (the sample mean)" in text


def test_write_between_replaces_only_the_marked_part(tmp_path):
    start, end = suite_report.TABLE_START, suite_report.TABLE_END
    path = tmp_path / "README.md"
    path.write_text(f"# Title\n\nintro\n{start}\nold\n{end}\n\nrest\n")
    write_between(path, start, end, f"{start}\nnew\n{end}")
    assert path.read_text() == f"# Title\n\nintro\n{start}\nnew\n{end}\n\nrest\n"


def test_the_quick_suite_keeps_its_own_section_and_figure(tmp_path):
    quick = {**_result(), "name": "suite_quick"}
    text = suite_report.markdown(quick, "make bench-quick")
    start, end = suite_report.markers("suite_quick")
    assert text.startswith(start) and text.endswith(end) and suite_report.START not in text
    doc = tmp_path / "results.md"
    doc.write_text(f"# Results\n\n{suite_report.START}\nfull\n{suite_report.END}\n\nhand-written\n")
    write_between(doc, start, end, text)
    assert (
        f"{suite_report.START}\nfull\n{suite_report.END}" in doc.read_text()
    )  # the full suite's section is kept
    assert suite_report.plot_path("suite").name == "results.png"
    assert suite_report.plot_path("suite_quick").name == "results_quick.png"


def test_mining_quality_is_averaged_over_seeds_per_class():
    result = _result()
    seeds = [
        {"slash": {"selected": 10, "lrp_mask_overlap_with_spurious_region": 0.8, "precision_vs_oracle": 1.0}},
        {"slash": {"selected": 6, "lrp_mask_overlap_with_spurious_region": 0.6, "precision_vs_oracle": 0.5}},
    ]
    result["quality"]["background"]["SCORE (auto)"] = {
        **result["quality"]["background"]["DFR"],
        "mining": seeds,
    }
    text = suite_report.markdown(result, "make bench")
    assert "| background | SCORE (auto) | slash | 8.00 | 0.70 | 0.75 |" in text
    assert "| background | DFR |" not in text.split("SCORE mining quality", 1)[1]


def test_runs_not_finished_are_listed_and_drawn_without_a_bar(monkeypatch, tmp_path):
    result = _result()
    result["quality"]["patch"]["PruSC"] = {
        "after": {},
        "before": None,
        "wall_s": [],
        "failed": {},
        "not_run": [0, 1],
    }
    text = suite_report.markdown(result, "make bench")
    assert "Not run yet (left out of the means): PruSC seed 0, PruSC seed 1." in text
    monkeypatch.setattr(suite_report, "plot_path", lambda name: tmp_path / "plot.png")
    suite_report.plot(result)
    assert (tmp_path / "plot.png").stat().st_size > 0


def _configs(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny ERM config and a stage file on top of it (JTT, whose config turns on loaders rebuilt every epoch)."""
    erm, stage = tmp_path / "erm.yaml", tmp_path / "jtt.yaml"
    erm.write_text(
        "trainer: {max_epochs: 2, logger: {class_path: lightning.pytorch.loggers.TensorBoardLogger, "
        "init_args: {save_dir: runs, name: stage}}}\n"
        "data: {class_path: shortcut_lightning.data.SyntheticShortcuts, init_args: {image_size: 32}}\n"
    )
    stage.write_text(
        "trainer:\n  reload_dataloaders_every_n_epochs: 1\n  callbacks+:\n"
        "    - class_path: shortcut_lightning.callbacks.JustTrainTwice\n      init_args: {identify_epochs: 1}\n"
    )
    return erm, stage


def test_a_finished_run_is_reused_only_with_the_same_resolved_configuration(tmp_path, monkeypatch):
    """How a killed suite resumes: a finished run is read, not rerun, when today's command resolves to the
    configuration it saved; a repeated setting at its value, a comment or an argument moved into a config file
    change nothing (so inert settings can be deleted); a changed setting reruns."""
    from bench.resolved_config import resolve

    erm, stage = _configs(tmp_path)
    calls = []

    def fake_cli(
        args,
    ):  # stands in for `shortcut fit`: writes what a finished run leaves, config.yaml included
        calls.append(args)
        run_dir = Path(args[args.index("--trainer.logger.init_args.save_dir") + 1]) / "stage" / "seed0"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").write_text(json.dumps({"wga": 0.1 * len(calls)}))
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolve(args)))

    monkeypatch.setattr(quality, "cli_main", fake_cli)
    runs, files = tmp_path / "runs", [str(erm), str(stage)]
    first = quality.run(files, 0, runs, ["--data.n_train", "96"], reuse=True)
    again = quality.run(files, 0, runs, ["--data.n_train", "96"], reuse=True)
    assert len(calls) == 1 and again[0] == first[0] and again[3] == first[3]
    # the stage's own reload setting given again on the command line (photo_variants' RELOAD, deleted): the same run
    reload = ["--trainer.reload_dataloaders_every_n_epochs", "1"]
    quality.run(files, 0, runs, ["--data.n_train", "96", *reload], reuse=True)
    stage.write_text("# a comment\n" + stage.read_text())
    quality.run(files, 0, runs, ["--data.n_train", "96"], reuse=True)
    erm.write_text(erm.read_text() + "model: {backbone: resnet18}\n")  # resnet18 is the default backbone
    quality.run(files, 0, runs, ["--data.n_train", "96"], reuse=True)
    assert len(calls) == 1
    changed = quality.run(files, 0, runs, ["--data.n_train", "97"], reuse=True)
    assert len(calls) == 2 and changed[0]["wga"] == pytest.approx(0.2)
    stage.write_text(stage.read_text().replace("identify_epochs: 1", "identify_epochs: 2"))
    quality.run(files, 0, runs, ["--data.n_train", "97"], reuse=True)
    assert len(calls) == 3
    with pytest.raises(quality.NotRun):  # another seed has not finished
        quality.run(files, 1, runs, ["--data.n_train", "97"], reuse=True, run_missing=False)
    quality.run(files, 0, runs, ["--data.n_train", "97"], reuse=False)
    assert len(calls) == 4  # without reuse every run is fresh


def test_the_run_key_leaves_out_what_a_stage_declares_inert(tmp_path):
    """PruSC's mask settings without a mask epoch (``PruSCConfig.inert``) are out of the key, so the photo
    control's lr 0 / logit 50 could leave bench/photo_rows.py; with a mask epoch, or a negative logit, they count."""
    from bench.resolved_config import resolve, run_key

    erm, _ = _configs(tmp_path)

    def key(**init_args) -> dict:
        stage = tmp_path / "prusc.yaml"
        stage.write_text(
            yaml.safe_dump(
                {
                    "trainer": {
                        "callbacks+": [
                            {"class_path": "shortcut_lightning.callbacks.MaskPruning", "init_args": init_args}
                        ]
                    }
                }
            )
        )
        return run_key(resolve(["fit", "--config", str(erm), "--config", str(stage)]))

    fine_tune = {"prune_epochs": 0, "finetune_epochs": 2}
    assert key(**fine_tune) == key(**fine_tune, mask_lr=0.0, init_logit=50.0)
    assert key(**fine_tune) != key(**fine_tune, init_logit=-1.0)
    assert key(prune_epochs=1) != key(prune_epochs=1, mask_lr=0.0)
    assert key(prune_epochs=1) != key(prune_epochs=1, init_logit=50.0)


def test_a_changed_callback_and_top_level_settings_make_one_resolved_file(tmp_path):
    from bench.stage_configs import config_with

    erm, stage = _configs(tmp_path)
    files = [str(erm), str(stage)]
    assert config_with(files, "same", {}, tmp_path / "out") == files
    view = {
        "class_path": "shortcut_lightning.callbacks.BatchNormRecalibration",
        "init_args": {"split": "train"},
    }
    changed = config_with(
        files, "row", {"JustTrainTwice": {"upweight": 5.0}}, tmp_path / "out", (view,), trainer__max_epochs=4
    )
    data = yaml.safe_load(Path(changed[0]).read_text())
    assert changed == [str(tmp_path / "out" / "row.yaml")] and data["trainer"]["max_epochs"] == 4
    jtt, recalibration = data["trainer"]["callbacks"]
    assert jtt["init_args"]["upweight"] == 5.0 and jtt["init_args"]["identify_epochs"] == 1
    assert recalibration["class_path"].endswith("BatchNormRecalibration")


def test_a_run_the_cli_refuses_is_an_error_not_the_end_of_the_suite(tmp_path, monkeypatch):
    """The CLI exits 2 on our input errors (e.g. SCORE's oracle finding nothing): SystemExit would end
    the whole suite, so the runner turns it into an exception the suite records as a failed run."""

    def refusing_cli(args):
        raise SystemExit(2)

    monkeypatch.setattr(quality, "cli_main", refusing_cli)
    with pytest.raises(RuntimeError, match="exited with status 2"):
        quality.run([str(tmp_path / "stage.yaml")], 0, tmp_path / "runs", [])


def test_quality_runs_only_the_methods_named_and_leaves_the_erm_row_to_dfr(tmp_path, monkeypatch):
    """``--methods AFR``: one row is run per seed, and no ERM row is written (the merge keeps the last one)."""
    ran = []

    def fake_run(configs, seed, save_dir, extra, **kwargs):
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
    assert all(Path(f).is_file() for _, files, _ in suite.METHODS for f in files)


def test_embedded_variants_parse_settings_and_the_tested_checkpoint_is_the_clis(tmp_path):
    """The checkpoint a run was tested on is the library's ``tested_checkpoint`` of the run's stages, built from
    its config.yaml: the monitor's best for a training regime, the stage's own file where it changed the model
    at the end of fit (DFR's dfr.ckpt, SCORE's fine-tuned last.ckpt; the s-score's only when it prunes)."""
    import torch

    variants = importlib.import_module("bench.embedded_variants")
    assert variants.overrides(["GroupDRO.step_size=0.1", "GroupDRO.adjustment=2"]) == {
        "GroupDRO": {"step_size": 0.1, "adjustment": 2}
    }
    with pytest.raises(SystemExit, match=r"Class\.argument=value"):
        variants.overrides(["step_size=0.1"])
    assert run_files.selected_by(tmp_path) == (None, None)  # no last.ckpt: no monitor chose
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    best = folder / "epoch001.ckpt"
    key = "BestAndLastCheckpoint{'monitor': 'val/worst_class'}"
    state = {
        "monitor": "val/worst_class",
        "best_model_score": torch.tensor(0.75),
        "best_model_path": str(best),
    }
    torch.save({"callbacks": {"GroupDRO": {}, key: state}}, folder / "last.ckpt")
    assert run_files.selected_by(tmp_path) == ("val/worst_class", 0.75)
    best.write_bytes(b"")

    def tested(class_path: str, **init_args) -> str:
        callback = {"class_path": f"shortcut_lightning.callbacks.{class_path}", "init_args": init_args}
        projector = {"class_path": "shortcut_lightning.callbacks.EmbeddingProjector"}  # not a stage: left out
        config = {"trainer": {"callbacks": [projector, callback]}}
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
        return run_files.tested_checkpoint(tmp_path).name

    assert tested("GroupDRO") == "epoch001.ckpt"
    assert tested("NeuronRegularization") == "last.ckpt"  # SCORE tests its fine-tuned model
    assert tested("DeepFeatureReweighting") == "last.ckpt"  # no dfr.ckpt (yet): the fit's last state
    (folder / "dfr.ckpt").write_bytes(b"")
    assert tested("DeepFeatureReweighting") == "dfr.ckpt"
    (folder / "sscore.ckpt").write_bytes(b"")
    assert tested("SpuriousScore") == "epoch001.ckpt"  # scores only: the model is ERM's best
    assert tested("SpuriousScore", prune_above=0.7) == "sscore.ckpt"


def test_the_stage_command_reads_prusc_s_report_from_its_json(tmp_path):
    """``python -m bench stage prusc`` (once stage_from_checkpoint.py, which called ``.get`` on the PruSCReport
    dataclass after a full fit) reads the report the stage wrote."""
    stage = importlib.import_module("bench.stage")
    assert stage.prusc_summary(tmp_path) == []  # SCORE or the control: no prusc.json
    report = {
        "densities": {"net.fc": 0.9, "Prune_f": 0.1234, "Prune_h": 0.5},
        "best": {"monitor": "val/worst_class", "epoch": 3, "score": 0.7},
        "fixed": {"test": {"wga": 0.61, "mean": 0.8}},
    }
    (tmp_path / "prusc.json").write_text(json.dumps(report))
    assert stage.prusc_summary(tmp_path) == [
        "{'Prune_f': 0.123, 'Prune_h': 0.5}",
        "best epoch 3",
        "fixed wga 0.610 mean 0.800",
    ]


def test_every_photo_row_says_how_much_group_information_it_uses():
    from bench.group_labels import GROUP_INFO
    from bench.photo_rows import stage_rows

    rows = [*stage_rows("erm.ckpt"), "ERM", "DFR (scikit-learn reference)"]
    assert [row for row in rows if row not in GROUP_INFO] == []
    assert all(Path(ROOT, f).is_file() for files, _, _, _ in stage_rows("erm.ckpt").values() for f in files)


def test_one_runner_lists_every_command_and_each_takes_its_options(capsys):
    """``python -m bench`` lists the commands; each one's module imports and builds its argparse options."""
    import argparse

    runner = importlib.import_module("bench.__main__")
    runner.main([])
    listed = capsys.readouterr().out
    for name, (module_name, _) in runner.COMMANDS.items():
        assert f"  {name} " in listed
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        assert callable(module.main) and module.__doc__
    with pytest.raises(SystemExit, match="no command 'nope'"):
        runner.main(["nope"])


def test_score_neurons_counts_what_each_selection_rule_takes():
    from bench.score_neurons import _counts

    scores = [0.0] * 18 + [1.0, 5.0]  # mean 0.3, std about 1.13: one channel above mean + 1 std and + 2 std
    assert _counts(scores) == {"num_neurons 10": 10, "z_score 1": 1, "z_score 2": 1, "neuron_share 0.1": 2}
    assert _counts([0.0, 1.0, 2.0, 3.0])["z_score 1"] == 1


def test_validation_chooses_the_score_penalty_on_the_seeds_every_variant_ran():
    from bench.photos_report import score_choice

    def row(*runs: tuple[int, float]) -> dict:
        return {"per_seed": [{"seed": s, "val_worst_class": v} for s, v in runs]}

    rows = {
        "ERM": row((0, 0.9), (1, 0.9)),
        "SCORE (auto)": row((0, 0.70), (1, 0.80)),
        "SCORE (contribution)": row((0, 0.84), (1, 0.60)),
        "SCORE (masked logit)": row((0, 0.73)),  # seed 1 did not run: only seed 0 is compared
    }
    text = score_choice({"models": {"efficientnet": rows}})
    assert "**SCORE (contribution)**" in text and "seeds 0)" in text and "SCORE (auto) 0.700" in text
    del rows["SCORE (masked logit)"]  # both seeds now: auto's mean 0.750 beats contribution's 0.720
    assert "**SCORE (auto)**" in score_choice({"models": {"efficientnet": rows}})
    del rows["SCORE (contribution)"]
    assert score_choice({"models": {"efficientnet": rows}}) == ""  # one variant: nothing to choose


def test_the_scikit_learn_reference_weights_groups_equally_at_mean_one():
    """The reference DFR's sample weights: each present group the same total, mean 1, so ``C=0.1`` is the
    regularisation it says (``1 / count`` weights summed to the number of groups and made it ~150x stronger)."""
    from bench.sklearn_reference import balanced_weights

    groups = np.array([0] * 150 + [1] * 50 + [3] * 10)  # group 2 absent
    weights = balanced_weights(groups)
    assert weights.mean() == pytest.approx(1.0)
    totals = [weights[groups == g].sum() for g in (0, 1, 3)]
    assert totals == pytest.approx([len(groups) / 3] * 3)
