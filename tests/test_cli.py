"""The `shortcut` CLI end to end on tiny synthetic data, its errors, and kill-and-resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shortcut_lightning import SyntheticShortcuts
from shortcut_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY_ARGS = [
    "--data.n_train",
    "96",
    "--data.n_val",
    "37",
    "--data.n_test",
    "41",
    "--data.batch_size",
    "16",
    "--model.backbone",
    "test_resnet",
    "--trainer.enable_progress_bar",
    "false",
]


def config_args(*names: str) -> list[str]:
    """``--config configs/<name>`` for each name in order: a dataset's ``erm.yaml``, then its stage files."""
    return [arg for name in names for arg in ("--config", str(ROOT / "configs" / name))]


def run_cli(
    tmp_path: Path, *extra: str, subcommand: str = "fit", configs: tuple[str, ...] = ("synthetic/erm.yaml",)
) -> Path:
    """Runs the CLI in-process; returns the run's log directory."""
    save_dir = tmp_path / "runs"
    main(
        [
            subcommand,
            *config_args(*configs),
            *TINY_ARGS,
            "--trainer.logger.init_args.save_dir",
            str(save_dir),
            *extra,
        ]
    )
    return max(save_dir.glob("*/version_*"), key=lambda p: p.stat().st_mtime)


def run_stage_config(tmp_path: Path, stage: str, callback_args: list[dict]) -> Path:
    """``configs/synthetic/erm.yaml`` with the stage file ``configs/<stage>`` on top, shortened to 2 epochs
    (each of the stage's callbacks' init_args updated in order), run on tiny data through the CLI; returns the
    run's log directory."""
    import yaml

    data = yaml.safe_load((ROOT / "configs" / stage).read_text())
    for callback, args in zip(data["trainer"]["callbacks+"], callback_args, strict=True):
        callback["init_args"].update(args)
    short = tmp_path / Path(stage).name
    short.write_text(yaml.safe_dump(data))
    save_dir = tmp_path / "runs"
    main(
        [
            "fit",
            *config_args("synthetic/erm.yaml"),
            "--config",
            str(short),
            "--trainer.max_epochs",
            "2",
            *TINY_ARGS,
            "--trainer.logger.init_args.save_dir",
            str(save_dir),
        ]
    )
    return next(save_dir.glob(f"{data['trainer']['logger']['init_args']['name']}/version_*"))


def test_fit_then_test_end_to_end(tmp_path, capsys):
    log_dir = run_cli(tmp_path, "--trainer.max_epochs", "2")
    report = json.loads((log_dir / "metrics.json").read_text())
    assert report["split"] == "test"
    assert set(report["groups"]) == {"backslash_land", "backslash_water", "slash_land", "slash_water"}
    assert sum(g["n"] for g in report["groups"].values()) == 41
    accs = [g["acc"] for g in report["groups"].values()]
    assert report["wga"] == pytest.approx(min(accs))
    assert json.loads((log_dir / "metrics_val.json").read_text())["split"] == "val"
    assert (log_dir / "checkpoints" / "last.ckpt").is_file() and (log_dir / "config.yaml").is_file()
    assert "test accuracy by group" in capsys.readouterr().out
    events = list(log_dir.glob("events.out.tfevents.*"))
    assert events, "TensorBoard logs are written"


def test_validate_a_checkpoint(tmp_path, capsys):
    log_dir = run_cli(tmp_path, "--trainer.max_epochs", "1", "--test_after_fit", "false")
    assert not (log_dir / "metrics.json").exists()
    ckpt = log_dir / "checkpoints" / "last.ckpt"
    val_dir = run_cli(tmp_path, "--ckpt_path", str(ckpt), subcommand="validate")
    assert json.loads((val_dir / "metrics.json").read_text())["split"] == "val"
    assert "val accuracy by group" in capsys.readouterr().out
    pred_dir = run_cli(tmp_path, "--ckpt_path", str(ckpt), subcommand="predict")
    rows = (pred_dir / "predictions.csv").read_text().splitlines()
    assert rows[0] == "index,target,group,pred,logit_0,logit_1" and len(rows) == 1 + 41


@pytest.mark.parametrize(
    "config,args,message",
    [
        (
            "waterbirds/erm.yaml",
            ["--data.root", "/nonexistent/waterbirds"],
            r"/nonexistent/waterbirds does not exist.*docs/datasets.md",
        ),
        ("synthetic/erm.yaml", ["--model.backbone", "resnet181"], r"unknown backbone 'resnet181'"),
        ("synthetic/erm.yaml", ["--data.spurious", "texture"], r"data.spurious 'texture'"),
    ],
)
def test_bad_input_is_one_line_with_the_fix(tmp_path, capsys, config, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / config),
                *args,
                "--trainer.logger.init_args.save_dir",
                str(tmp_path),
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("shortcut: error:")
    import re

    assert re.search(message, err), err


def test_killed_run_resumes_to_the_same_metrics(tmp_path):
    """SIGKILL mid-epoch in a subprocess, resume from last.ckpt, compare with an uninterrupted run."""
    epochs = ["--trainer.max_epochs", "3"]
    straight = run_cli(tmp_path / "straight", *epochs)
    crashed_dir = tmp_path / "crashed" / "runs"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shortcut_lightning",
            "fit",
            *config_args("synthetic/erm.yaml"),
            *TINY_ARGS,
            *epochs,
            "--trainer.logger.init_args.save_dir",
            str(crashed_dir),
            "--trainer.callbacks+=helpers.KillAt",
            "--trainer.callbacks.epoch=2",
            "--trainer.callbacks.batch=2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    last = next(crashed_dir.glob("*/version_*/checkpoints/last.ckpt"))
    resumed = run_cli(tmp_path / "crashed", *epochs, "--ckpt_path", str(last))
    want = json.loads((straight / "metrics.json").read_text())
    got = json.loads((resumed / "metrics.json").read_text())
    assert got == want


@pytest.mark.parametrize("monitor", ["val/worst_class", "val/balanced"])
def test_group_free_checkpoint_monitors_select_the_best_epoch(tmp_path, monitor):
    """Model selection without group labels: the checkpoint kept is the epoch with the best ``monitor``."""
    log_dir = run_cli(tmp_path, "--trainer.max_epochs", "3", "--checkpoint.monitor", monitor)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = [e.value for e in EventAccumulator(str(log_dir)).Reload().Scalars(monitor)]
    assert len(logged) == 3  # one validation per epoch
    best = list((log_dir / "checkpoints").glob("epoch*.ckpt"))
    assert len(best) == 1
    saved = torch.load(best[0], weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if "BestAndLastCheckpoint" in k)
    assert state["monitor"] == monitor and state["best_model_score"].item() == pytest.approx(max(logged))
    assert saved["epoch"] == logged.index(max(logged))


def test_last_checkpoint_follows_every_epoch_when_the_metric_stalls(tmp_path):
    # lr 0: val/mean never improves after epoch 0, so only epoch 0 is a top-k save; last.ckpt must still move
    log_dir = run_cli(tmp_path, "--trainer.max_epochs", "3", "--model.optimizer.init_args.lr", "0.0")
    ckpts = log_dir / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["epoch"] == 2
    assert [p.name for p in ckpts.glob("epoch*.ckpt")] == ["epoch000.ckpt"]


def test_prusc_config_end_to_end_and_its_pruned_model_as_weights(tmp_path):
    """configs/synthetic/prusc.yaml, shortened: ERM epoch, mask learning, test of the pruned model; then the
    exported pruned.ckpt, loaded as plain weights by the ERM config, tests the same."""
    log_dir = run_stage_config(
        tmp_path, "synthetic/prusc.yaml", [dict(start_epoch=1, prune_epochs=1, num_clusters=4)]
    )
    report = json.loads((log_dir / "prusc.json").read_text())
    assert report["parameters"]["num_clusters"] == 4
    assert {"Prune_f", "Prune_h", "Prune_f_reachable"} <= set(report["densities"])
    # the config keeps the best validated of the dense model (epoch None) and the one mask epoch (1)
    best = report["best"]
    assert best["monitor"] == "val/worst_class" and best["epoch"] in (None, 1) and 0 <= best["score"] <= 1
    assert best["score"] >= report["before"]["val"]["worst_class"]
    tested = json.loads((log_dir / "metrics.json").read_text())
    assert tested["mean"] == pytest.approx(report["after"]["test"]["mean"])
    pruned = log_dir / "checkpoints" / "pruned.ckpt"
    again = run_cli(tmp_path / "again", "--model.weights", str(pruned), subcommand="test")
    assert json.loads((again / "metrics.json").read_text())["groups"] == tested["groups"]


def test_score_config_end_to_end_prints_the_test_table_before_and_after(tmp_path, capsys):
    """configs/synthetic/score.yaml (what ``make demo`` runs), shortened: ERM epoch, mining, a regularized epoch;
    one before/after table whose columns are mining.json's report and the final test."""
    mining = dict(
        start_epoch=1, top_m=8, n_confusers=4, num_selected=3, num_neurons=4, require_masked_prediction=False
    )
    log_dir = run_stage_config(tmp_path, "synthetic/score.yaml", [mining, dict(start_epoch=1)])
    mined = json.loads((log_dir / "mining.json").read_text())
    tested = json.loads((log_dir / "metrics.json").read_text())
    out = capsys.readouterr().out
    table = out.split("SCORE: test accuracy before and after the stage", 1)[1].split("\n\n", 1)[0]
    wga_line = next(line for line in table.splitlines() if line.startswith("wga"))
    assert wga_line.split()[1:] == [f"{mined['before']['test']['wga']:.3f}", f"{tested['wga']:.3f}"]
    assert (log_dir / "review_backslash.png").is_file()


def test_two_processes_from_the_cli_give_the_one_process_metrics(tmp_path):
    """``--trainer.devices 2 --trainer.strategy ddp_spawn`` through the CLI (the parser is pickled into the
    workers: a lazy_instance default logger used to make them fail and the parent wait forever)."""
    log_dir = run_cli(tmp_path, "--trainer.max_epochs", "1", "--test_after_fit", "false")
    ckpt = str(log_dir / "checkpoints" / "last.ckpt")
    args = ("--ckpt_path", ckpt, "--trainer.accelerator", "cpu")
    one = run_cli(
        tmp_path / "one", *args, subcommand="test", configs=("synthetic/erm.yaml", "synthetic/dfr.yaml")
    )
    two = run_cli(
        tmp_path / "two",
        *args,
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp_spawn",
        subcommand="test",
        configs=("synthetic/erm.yaml", "synthetic/dfr.yaml"),
    )
    single, double = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    flat = [{g: (v["acc"], v["n"]) for g, v in r["groups"].items()} for r in (single, double)]
    assert flat[0] == flat[1] and double["wga"] == pytest.approx(single["wga"])


def test_baseline_configs_run_end_to_end(tmp_path, capsys):
    """The baselines' configs through the CLI: JTT writes its error set, GroupDRO logs its weights, AFR refits."""
    jtt = run_stage_config(tmp_path, "synthetic/jtt.yaml", [dict(identify_epochs=1)])
    report = json.loads((jtt / "jtt.json").read_text())
    assert report["n_errors"] == len(report["error_indices"]) and report["uses_annotations"] is False
    assert report["draw"] == "upsample"  # the config's paper draw, with loaders rebuilt every epoch
    assert json.loads((jtt / "metrics.json").read_text())["split"] == "test"
    dro = run_stage_config(tmp_path, "synthetic/groupdro.yaml", [dict(step_size=0.1)])
    assert json.loads((dro / "metrics.json").read_text())["split"] == "test"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    afr = run_stage_config(tmp_path, "synthetic/afr.yaml", [dict(gamma=2.0)])
    assert json.loads((afr / "afr.json").read_text())["gamma"] == 2.0
    assert json.loads((afr / "metrics.json").read_text())["split"] == "test"
    tags = EventAccumulator(str(dro)).Reload().Tags()["scalars"]
    names = SyntheticShortcuts(spurious="background").group_names
    assert {t for t in tags if t.startswith("groupdro/q/")} == {f"groupdro/q/{g}" for g in names}
