"""The shipped configs: each dataset's ``erm.yaml``, alone and under each stage file of its folder, parses through
the ``shortcut`` CLI (``--print_config``; no model or data is built), and a stage file brings its callbacks
without dropping another's, so stages compose. The README and docs name only configs that exist."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def combinations() -> list[tuple[Path, ...]]:
    """Every shipped combination: ``<dataset>/erm.yaml`` alone, and with each other file of its folder on top."""
    found: list[tuple[Path, ...]] = []
    for erm in sorted(CONFIGS.glob("*/erm.yaml")):
        found.append((erm,))
        found += [(erm, stage) for stage in sorted(erm.parent.glob("*.yaml")) if stage.name != "erm.yaml"]
    return found


class _Parsed(Exception):
    pass


@pytest.fixture(scope="module")
def print_config():
    """``shortcut fit --config ... --print_config`` through the CLI's own parser, built once; the printed YAML."""
    from shortcut_lightning.cli import ShortcutCLI

    class ParserOnly(ShortcutCLI):
        def parse_arguments(self, parser: Any, args: Any) -> None:
            raise _Parsed(parser)

    with pytest.raises(_Parsed) as parsed:
        ParserOnly(args=[])
    parser = parsed.value.args[0]

    def printed(*files: Path) -> dict[str, Any]:
        out, err = io.StringIO(), io.StringIO()
        args = ["fit", *(a for f in files for a in ("--config", str(f))), "--print_config"]
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            pytest.raises(SystemExit) as stop,
        ):
            parser.parse_args(args)
        assert stop.value.code == 0, f"{' + '.join(f.name for f in files)}: {err.getvalue().strip()[-500:]}"
        return yaml.safe_load(out.getvalue())

    return printed


def _name(files: tuple[Path, ...]) -> str:
    return " + ".join(str(f.relative_to(CONFIGS)) for f in files)


def test_every_dataset_folder_has_an_erm_config_and_stages():
    assert len(combinations()) >= 45 and all(len(c) in (1, 2) for c in combinations())
    assert [
        p for p in CONFIGS.rglob("*.yaml") if p.parent != CONFIGS and not (p.parent / "erm.yaml").is_file()
    ] == []


@pytest.mark.parametrize("files", combinations(), ids=_name)
def test_every_shipped_combination_parses(print_config, files):
    config = print_config(*files)
    stage = files[-1].stem
    callbacks = config["trainer"]["callbacks"] or []
    if stage == "erm":
        assert callbacks == [], "erm.yaml is the base every stage builds on: no stage in it"
    else:
        assert callbacks, f"{_name(files)} adds no callback"
    for callback in callbacks:  # every class_path names a callback of the library
        assert callback["class_path"].startswith("shortcut_lightning.callbacks.")


def test_stage_files_append_their_callbacks_so_stages_compose(print_config):
    """A stage file appends (``callbacks+``): a later ``--config`` with plain ``callbacks`` would replace the list
    and drop the stages before it."""
    for erm in CONFIGS.glob("*/erm.yaml"):
        for stage in erm.parent.glob("*.yaml"):
            trainer = yaml.safe_load(stage.read_text()).get("trainer") or {}
            assert "callbacks" not in trainer, f"{stage.relative_to(CONFIGS)}: use callbacks+ (append)"
    synthetic = CONFIGS / "synthetic"
    both = print_config(synthetic / "erm.yaml", synthetic / "bn_recalibration.yaml", synthetic / "afr.yaml")
    names = [c["class_path"].rsplit(".", 1)[1] for c in both["trainer"]["callbacks"]]
    assert names == ["BatchNormRecalibration", "AutomaticFeatureReweighting"]
    assert both["trainer"]["logger"]["init_args"]["name"] == "synthetic_afr"  # the last file names the run


def test_the_docs_name_only_configs_that_exist():
    docs = [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md"))]
    named = {(doc.name, m) for doc in docs for m in re.findall(r"configs/[\w/]+\.yaml", doc.read_text())}
    assert sorted((doc, path) for doc, path in named if not (ROOT / path).is_file()) == []
