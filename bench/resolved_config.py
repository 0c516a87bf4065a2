"""A run's configuration as the ``shortcut`` CLI resolves it (its ``--print_config``): what the run cache keys on.

The resolved configuration holds every setting with its value, whichever file or argument gave it, so two
commands that run the same thing resolve alike: a setting repeated at its value (a config's own
``reload_dataloaders_every_n_epochs: 1`` given again on the command line), an argument moved from one
``--config`` file into another, or comments and key order, change nothing. The parser is built once per
process (about 0.1 s a resolution after that); no model or data is built.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
from typing import Any

import yaml

# where a run's files go, not what it computes: the cache finds a run by looking there already
LOCATION = ("save_dir", "name", "version")


class _Parsed(Exception):
    """Carries the CLI's parser out of its constructor, before anything is parsed or built."""


@functools.cache
def cli_parser() -> Any:
    """The ``shortcut`` command's parser (LightningCLI's), built once."""
    from shortcut_lightning.cli import ShortcutCLI

    class ParserOnly(ShortcutCLI):
        def parse_arguments(self, parser: Any, args: Any) -> None:
            raise _Parsed(parser)

    try:
        ParserOnly(args=[])
    except _Parsed as parsed:
        return parsed.args[0]
    raise RuntimeError("ShortcutCLI built no parser")  # pragma: no cover


def resolve(args: list[str]) -> dict[str, Any]:
    """The configuration ``shortcut <args>`` runs with (``args`` start with the subcommand), as its
    ``--print_config`` prints it; a ``ValueError`` with the CLI's message when it does not parse."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli_parser().parse_args([*args, "--print_config"])
        except SystemExit as stop:
            if stop.code:
                message = err.getvalue().strip().splitlines()
                raise ValueError(
                    f"shortcut {' '.join(args)}: {message[-1] if message else stop.code}"
                ) from None
    return yaml.safe_load(out.getvalue())


def run_key(resolved: dict[str, Any]) -> dict[str, Any]:
    """``resolved`` without where the run's files go (the logger's folder, name and version) and without the
    stage arguments that its other settings make inert (:func:`inert_arguments`)."""
    key = copy.deepcopy(resolved)
    trainer = key.get("trainer") or {}
    logger = trainer.get("logger")
    if isinstance(logger, dict) and isinstance(logger.get("init_args"), dict):
        for name in LOCATION:
            logger["init_args"].pop(name, None)
    for callback in trainer.get("callbacks") or []:
        init_args = callback.get("init_args") if isinstance(callback, dict) else None
        if isinstance(init_args, dict):
            for name in inert_arguments(callback.get("class_path", ""), init_args):
                init_args.pop(name)
    return key


def inert_arguments(class_path: str, init_args: dict[str, Any]) -> tuple[str, ...]:
    """The init arguments of the callback ``class_path`` whose values change nothing beside the others, as
    the stage itself declares them (``PruSCConfig.inert``: PruSC's mask settings without a mask epoch)."""
    if class_path.rsplit(".", 1)[-1] != "MaskPruning":
        return ()
    from shortcut_lightning.methods.prusc.arguments import PruSCConfig

    return PruSCConfig.of(init_args).inert()
