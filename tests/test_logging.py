"""The library's info lines come from ``shortcut_lightning.*`` loggers, on rank 0, and a user can silence them."""

from __future__ import annotations

import importlib
import logging

import pytest
from lightning.pytorch.utilities import rank_zero_only

import shortcut_lightning
from shortcut_lightning.methods.prusc.mask_pruning import MaskPruning
from shortcut_lightning.reporting.stage_report import write_stage_report

PACKAGE = logging.getLogger("shortcut_lightning")
NOTHING_PRUNED = "PruSC: the fit ended before start_epoch 3; nothing was pruned"


@pytest.fixture
def records(caplog, monkeypatch):
    """caplog's records of the package's loggers, whether or not the package logger propagates to the root."""
    monkeypatch.setattr(PACKAGE, "propagate", False)
    PACKAGE.addHandler(caplog.handler)
    yield caplog
    PACKAGE.removeHandler(caplog.handler)


def fit_ends_before_start_epoch() -> None:
    """A stage's info line without a fit: PruSC's stage saying it never started."""
    MaskPruning(start_epoch=3).on_fit_end(None, None)  # waiting: it says so and returns


def test_a_stage_info_line_comes_from_its_module_logger(records):
    fit_ends_before_start_epoch()
    [record] = [r for r in records.records if r.getMessage() == NOTHING_PRUNED]
    assert record.name == "shortcut_lightning.methods.prusc.mask_pruning"
    assert record.levelno == logging.INFO
    # the record names the stage's line, not the rank-0 helper's
    assert record.filename == "mask_pruning.py" and record.funcName == "on_fit_end"


def test_the_package_logger_at_warning_silences_the_info_lines(records, tmp_path):
    level = PACKAGE.level
    PACKAGE.setLevel(logging.WARNING)
    try:
        fit_ends_before_start_epoch()
        write_stage_report(tmp_path, "stage.json", {"a": 1}, summary=["a summary line"])
    finally:
        PACKAGE.setLevel(level)
    assert not [r for r in records.records if r.name.startswith("shortcut_lightning")]
    assert (tmp_path / "stage.json").is_file()  # only the line is gone, not the report
    fit_ends_before_start_epoch()
    assert [r.getMessage() for r in records.records] == [NOTHING_PRUNED]


def test_a_stage_report_is_logged_by_the_report_writer(records, tmp_path):
    write_stage_report(tmp_path, "stage.json", {"a": 1}, summary=["a summary line"])
    [record] = records.records
    assert record.name == "shortcut_lightning.reporting.stage_report"
    assert "a summary line" in record.getMessage()


def test_only_rank_zero_says_it(records, monkeypatch):
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    fit_ends_before_start_epoch()
    assert records.records == []


def test_without_logging_configured_the_lines_show_on_stderr(monkeypatch, capsys):
    """As Lightning's own logger: at import, INFO and a handler of the package's (the CLI shows its lines)."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # an interpreter where nobody set up logging
    monkeypatch.setattr(PACKAGE, "propagate", PACKAGE.propagate)
    monkeypatch.setattr(PACKAGE, "handlers", [])
    importlib.reload(shortcut_lightning)  # the package's import-time set-up, again
    assert PACKAGE.level == logging.INFO and not PACKAGE.propagate
    assert [type(h) for h in PACKAGE.handlers] == [logging.StreamHandler]
    fit_ends_before_start_epoch()
    assert NOTHING_PRUNED in capsys.readouterr().err.splitlines()
    PACKAGE.setLevel(logging.WARNING)
    try:
        fit_ends_before_start_epoch()
    finally:
        PACKAGE.setLevel(logging.INFO)
    assert capsys.readouterr().err == ""
