"""The ``shortcut`` command: LightningCLI with group metrics, checkpoints and a test pass after ``fit``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from shortcut_lightning.callbacks import BestAndLastCheckpoint, FiniteLoss, GroupMetrics, PredictionWriter
from shortcut_lightning.data import GroupDataModule
from shortcut_lightning.errors import ModelError, ShortcutError
from shortcut_lightning.metrics import format_group_table
from shortcut_lightning.module import ShortcutClassifier
from shortcut_lightning.stages import Stage, tested_checkpoint


class ShortcutCLI(LightningCLI):
    """``shortcut fit|validate|test|predict --config CONFIG``.

    Always on, each configurable under its own key: ``group_metrics`` (:class:`GroupMetrics`), ``checkpoint``
    (:class:`BestAndLastCheckpoint`, best by ``val/mean`` plus ``last.ckpt``), ``finite_loss``
    (:class:`FiniteLoss`: a NaN or infinite loss stops ``fit``) and ``predictions`` (:class:`PredictionWriter`:
    ``predict`` writes ``predictions.csv``, every DDP rank's rows). The number of
    classes is linked from the data into the model. TensorBoard logs go to ``runs/<name>/version_<n>``.
    After ``fit`` the best checkpoint is tested when the data has a test split (``--test_after_fit``);
    when a stage rewrote the model at the end of ``fit`` (DFR), the rewritten model is tested.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_data", True)
        # a class_path dict, not jsonargparse's lazy_instance: the parser is pickled with the trainer
        # under ddp_spawn, and a lazy instance's generated class cannot be unpickled in the workers
        logger = {"class_path": f"{TensorBoardLogger.__module__}.{TensorBoardLogger.__name__}"}
        logger["init_args"] = {"save_dir": "runs", "name": "shortcut"}
        kwargs.setdefault("trainer_defaults", {"logger": logger})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(ShortcutClassifier, GroupDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(GroupMetrics, "group_metrics")
        parser.add_lightning_class_args(BestAndLastCheckpoint, "checkpoint")
        parser.add_lightning_class_args(FiniteLoss, "finite_loss")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/mean",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:03d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="test the best checkpoint after fit"
        )

    def _parse_ckpt_path(self) -> None:
        """``--ckpt_path``: Lightning rebuilds the model from the checkpoint's hyper-parameters, so a checkpoint of
        another backbone than the config's would silently replace it; it is refused first, in one line naming both.

        Overrides a private ``LightningCLI`` method (``pyproject.toml`` bounds Lightning to the tested minor release).
        """
        subcommand = self.config.get("subcommand")
        ckpt = self.config[subcommand].get("ckpt_path") if subcommand else None
        backbone = self.config[subcommand].get("model", {}).get("backbone") if ckpt else None
        if backbone and Path(ckpt).is_file():
            saved = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters")
            other = (saved or {}).get("backbone")
            if other and other.split(".")[0] != backbone.split(".")[0]:  # resnet18.a1_in1k is a resnet18
                raise ModelError(
                    f"--ckpt_path {ckpt} holds a {other}, but the config's model is a {backbone}: pass the config "
                    f"the checkpoint was trained with, or --model.backbone {other}"
                )
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        """``fit --ckpt_path .../version_N/checkpoints/x.ckpt`` continues in that run's log directory.

        So TensorBoard curves continue and ``ModelCheckpoint`` keeps its best-k bookkeeping.
        """
        config = self.config[self.subcommand] if self.subcommand else self.config
        ckpt = config.get("ckpt_path")
        logger = config.get("trainer", {}).get("logger")
        if self.subcommand != "fit" or not ckpt or not isinstance(logger, Namespace):
            return
        path = Path(ckpt).expanduser().resolve()
        run_dir = path.parent.parent
        if path.parent.name != "checkpoints" or not run_dir.name.startswith("version_"):
            return
        if (
            logger.get("class_path", "").endswith("TensorBoardLogger")
            and logger.init_args.get("version") is None
        ):
            logger.init_args.save_dir = str(run_dir.parent.parent)
            logger.init_args.name = run_dir.parent.name
            logger.init_args.version = run_dir.name

    def after_fit(self) -> None:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if not config.get("test_after_fit", True) or self.trainer.interrupted:
            return
        if "test" not in getattr(self.datamodule, "splits", ()):
            return
        # a stage that rewrote the model at the end of fit (e.g. DFR) is tested as it is now, in memory (its
        # tested_checkpoint holds the same weights; loading it would run a model stage again)
        staged = any(stage.changes_model_at_fit_end for stage in self.stages)
        checkpoint = self.trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None else ""
        folder = Path(checkpoint.dirpath) if checkpoint is not None and checkpoint.dirpath else None
        ckpt = None if staged or folder is None else tested_checkpoint(self.stages, folder, best)
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt, verbose=False)
        self._print_before_after()

    @property
    def stages(self) -> list[Stage]:
        """The trainer's callbacks that follow the :class:`~shortcut_lightning.stages.Stage` contract."""
        return [cb for cb in self.trainer.callbacks if isinstance(cb, Stage)]

    def _print_before_after(self) -> None:
        """One before/after test table for a stage that left the model to the training loop (SCORE's mining).

        A stage that changes the model at the end of ``fit`` (DFR, PruSC) reports its own before/after tables.
        """
        metrics = next((cb for cb in self.trainer.callbacks if isinstance(cb, GroupMetrics)), None)
        after = metrics.reports.get("test") if metrics is not None else None
        if after is None or not self.trainer.is_global_zero:
            return
        for stage in self.stages:
            before = stage.before_reports.get("test")
            if before is not None and not stage.changes_model_at_fit_end:
                table = format_group_table({"before": before, "after": after})
                # the CLI's own output, on stdout beside the test table (the library's callbacks log instead)
                print(
                    f"\n{stage.stage_label}: test accuracy before and after the stage\n{table}\n", flush=True
                )


def user_error(exc: BaseException) -> ShortcutError | None:
    """Our input error behind ``exc``: jsonargparse wraps errors raised while it builds the classes."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ShortcutError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``shortcut`` console script; our input errors print as one line, exit 2."""
    try:
        ShortcutCLI(args=args)
    except Exception as exc:
        error = user_error(exc)
        if error is None:
            raise
        print(f"shortcut: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
