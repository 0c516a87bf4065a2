"""The composed configs a benchmark row runs: a dataset's ``erm.yaml`` and its stage files, with the row's changes.

``configs/<dataset>/erm.yaml`` holds the dataset's model, data and trainer; each other file of the folder is a
stage that goes on top of it (``shortcut fit --config configs/photos/erm.yaml --config configs/photos/dfr.yaml``).
A row that changes a callback's arguments gets one file: the resolved configuration of its files with the
change made, since a later ``--config`` cannot change one item of the callbacks list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from bench.resolved_config import resolve


def config_files(dataset: str, *stages: str) -> list[str]:
    """``configs/<dataset>/erm.yaml`` and each stage's file of that folder, in order."""
    return [f"configs/{dataset}/erm.yaml", *(f"configs/{dataset}/{stage}.yaml" for stage in stages)]


def slug(label: str) -> str:
    """A row's label as a file name: ``SCORE (oracle)`` -> ``SCORE_oracle``."""
    return label.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "")


def config_args(files: list[str]) -> list[str]:
    """``--config`` for each file."""
    return [arg for path in files for arg in ("--config", str(path))]


def config_with(
    files: list[str],
    name: str,
    overrides: dict[str, dict[str, Any]],
    out: Path,
    append: tuple[dict[str, Any], ...] = (),
    **top: Any,
) -> list[str]:
    """``files``, or with changes one file ``out/<name>.yaml``: their resolved configuration with callback
    init_args replaced by class name (``overrides``), callbacks appended (class_path and init_args) and
    ``top`` keys set (``a__b`` for ``a.b``)."""
    if not overrides and not top and not append:
        return files
    data = resolve(["fit", *config_args(files)])
    callbacks = data["trainer"].get("callbacks") or []
    for callback in callbacks:
        callback.setdefault("init_args", {}).update(
            overrides.get(callback["class_path"].rsplit(".", 1)[1], {})
        )
    data["trainer"]["callbacks"] = [*callbacks, *append] or None
    for dotted, value in top.items():
        node = data
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return [str(path)]
