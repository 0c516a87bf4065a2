"""A stage from an ERM checkpoint on the embedded benchmark, outside the CLI, as in the ablations of
docs/experiments (2026-11-23, PruSC and SCORE on the embedded benchmark).

    python -m bench stage {score|prusc|finetune} --checkpoint CKPT --variant {background|patch|both} \\
        --out OUT_DIR --setting 'JSON'

The checkpoint is loaded as ``model.weights``; the stage starts at epoch 0, the model is tested after the fit
and a RESULT line is printed. Setting keys, every stage: "epochs" (default 3), "lr" (AdamW of the module,
default 1e-3), "seed" (data seed, default 0), "backbone_kwargs" (e.g. {"output_stride": 8} for checkpoints of
configs/synthetic/sscore.yaml), "image_size" (default 32; the checkpoint's), "sampler" (the training sampler:
default, class_balanced or group_balanced; the last uses group labels).

- score: "mining" (SpuriousPositiveMining arguments), "reg" (NeuronRegularization arguments), "mining_file"
  (reuse a mining.json instead of mining; with "reg": {"strength": 0.0} this is the continued-ERM control).
- prusc: "prusc" (MaskPruning arguments). With a "monitor" among them, every epoch is validated (the monitor
  needs it); otherwise validation is skipped. With "finetune_epochs" among them, the RESULT line also gives
  the test worst-group accuracy of the masks alone (``fixed``), before the fine-tuning. The line reads the
  stage's report as the CLI writes it (OUT_DIR/prusc.json).
- finetune: no stage, the control: plain cross-entropy fine-tuning of the whole network on "train_split"
  (default train; "val" trains on the validation split, class labels only).

"sscore": true scores the model before the stage and after it with ``SpuriousScore`` (50 training samples,
alpha 0.5; needs a checkpoint with spatial maps at layer4, e.g. of configs/synthetic/sscore.yaml with
``"backbone_kwargs": {"output_stride": 8}``) into OUT_DIR/sscore_before and sscore_after (what
``python -m bench sscore-shift`` reads) and adds both means to the RESULT line, with the mean share of the image
their focus regions cover. "save": true writes the model after the stage to OUT_DIR/model.ckpt (its
``state_dict``, which ``model.weights`` reads, masks included), e.g. for ``python -m bench reachable-share``.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch

from shortcut_lightning import ShortcutClassifier
from shortcut_lightning.callbacks import (
    GroupMetrics,
    MaskPruning,
    NeuronRegularization,
    SpuriousPositiveMining,
    SpuriousScore,
)
from shortcut_lightning.data import SyntheticShortcuts

STAGES = ("score", "prusc", "finetune")


def stage_callbacks(stage: str, cfg: dict[str, Any]) -> list[L.Callback]:
    """The stage's callbacks for the setting ``cfg`` (none for the fine-tuning control)."""
    if stage == "finetune":
        return []
    if stage == "prusc":
        return [MaskPruning(**cfg.get("prusc", {}))]
    if "mining_file" in cfg:
        return [NeuronRegularization(mining_file=cfg["mining_file"], **cfg.get("reg", {}))]
    return [
        SpuriousPositiveMining(report_splits=("test",), **cfg.get("mining", {})),
        NeuronRegularization(**cfg.get("reg", {})),
    ]


def sscore_summary(
    model: L.LightningModule, dm: SyntheticShortcuts, out: Path, when: str
) -> dict[str, float]:
    """Mean s-score and focus share of ``model``'s penultimate neurons (``SpuriousScore`` in a validate pass)."""
    scorer = SpuriousScore(split="train", n_samples=50, alpha=0.5)
    trainer = L.Trainer(
        logger=False,
        default_root_dir=out / f"sscore_{when}",
        enable_progress_bar=False,
        inference_mode=False,
        callbacks=[scorer],
        limit_val_batches=1,
    )
    trainer.validate(model, datamodule=dm, verbose=False)
    return {f"sscore_{when}": scorer.result["mean"], f"focus_{when}": scorer.result["mean_focus_share"]}


def prusc_summary(out: Path) -> list[str]:
    """From the stage's prusc.json, where PruSC ran: the share of weights pruned, the kept mask epoch, and the
    masks' own test accuracy before a fine-tuning."""
    path = out / "prusc.json"
    if not path.is_file():
        return []
    report = json.loads(path.read_text())
    pruned = {k: round(v, 3) for k, v in report.get("densities", {}).items() if k.startswith("Prune")}
    best, fixed = report.get("best"), (report.get("fixed") or {}).get("test")
    return [
        str(pruned),
        *([f"best epoch {best['epoch']}"] if best else []),
        *([f"fixed wga {fixed['wga']:.3f} mean {fixed['mean']:.3f}"] if fixed else []),
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--checkpoint", required=True, help="the ERM checkpoint the stage starts from")
    parser.add_argument("--variant", required=True, choices=("background", "patch", "both"))
    parser.add_argument("--out", required=True, type=Path, help="where the stage's files go")
    parser.add_argument("--setting", default="{}", help="one JSON object (the keys above)")


def main(args: argparse.Namespace) -> None:
    cfg = json.loads(args.setting)
    out: Path = args.out
    torch.manual_seed(0)
    optimizer = partial(torch.optim.AdamW, lr=cfg.get("lr", 1e-3), weight_decay=1e-4)
    backbone_kwargs = cfg.get("backbone_kwargs")
    model = ShortcutClassifier(
        "resnet18",
        num_classes=2,
        weights=args.checkpoint,
        backbone_kwargs=backbone_kwargs,
        optimizer=optimizer,
    )
    seed = cfg.get("seed", 0)
    train_split = cfg.get("train_split", "train") if args.stage == "finetune" else "train"
    data = {"image_size": cfg.get("image_size", 32), "batch_size": 64, "seed": seed, "data_seed": seed}
    dm = SyntheticShortcuts(
        spurious=args.variant, sampler=cfg.get("sampler", "default"), train_split=train_split, **data
    )
    callbacks = stage_callbacks(args.stage, cfg)
    sscores = sscore_summary(model, dm, out, "before") if cfg.get("sscore") else {}
    validate = bool(cfg.get("prusc", {}).get("monitor"))
    start = time.time()
    trainer = L.Trainer(
        max_epochs=cfg.get("epochs", 3),
        default_root_dir=out,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[GroupMetrics(print_table=False), *callbacks],
        limit_val_batches=None if validate else 0,
    )
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    tested = json.loads((out / "metrics.json").read_text())
    if cfg.get("save"):
        torch.save({"state_dict": model.state_dict()}, out / "model.ckpt")
    if sscores:
        sscores.update(sscore_summary(model, dm, out, "after"))
    groups = {k: round(v["acc"], 3) for k, v in tested["groups"].items()}
    print(
        "RESULT",
        args.stage,
        json.dumps(cfg),
        f"wga {tested['wga']:.3f} mean {tested['mean']:.3f}",
        groups,
        f"{time.time() - start:.0f}s",
        *(f"{k} {v:.3f}" for k, v in sscores.items()),
        *prusc_summary(out),
        flush=True,
    )
