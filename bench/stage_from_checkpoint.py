"""A debiasing stage from an ERM checkpoint, as in the ablation tables of docs/results.md (not part of CI).

    python bench/stage_from_checkpoint.py {score|prusc|finetune} CKPT {background|patch|both} OUT_DIR 'JSON'

The checkpoint is loaded as ``model.weights``; the stage starts at epoch 0, the model is tested after
the fit and a RESULT line is printed. JSON keys, both stages: "epochs" (default 3), "lr" (AdamW of the
module, default 1e-3), "seed" (data seed, default 0), "backbone_kwargs" (e.g. {"output_stride": 8} for
checkpoints of configs/synthetic_sscore.yaml), "image_size" (default 32; the checkpoint's), "sampler" (the training sampler: default, class_balanced or
group_balanced; the last uses group labels).

- score: "mining" (SpuriousPositiveMining arguments), "reg" (NeuronRegularization arguments),
  "mining_file" (reuse a mining.json instead of mining; with "reg": {"strength": 0.0} this is the
  continued-ERM control).
- prusc: "prusc" (MaskPruning arguments). With a "monitor" among them, every epoch is validated (the
  monitor needs it); otherwise validation is skipped. With "finetune_epochs" among them, the RESULT
  line also gives the test worst-group accuracy of the masks alone (``fixed``), before the fine-tuning.
- finetune: no stage, the control: plain cross-entropy fine-tuning of the whole network on
  "train_split" (default train; "val" trains on the validation split, class labels only).

"sscore": true (both stages) scores the model before the stage and after it with ``SpuriousScore``
(50 training samples, alpha 0.5; needs a checkpoint with spatial maps at layer4, e.g. of
configs/synthetic_sscore.yaml with ``"backbone_kwargs": {"output_stride": 8}``) and adds both means to
the RESULT line, with the mean share of the image their focus regions cover (``mean_focus_share``).
"save": true writes the model after the stage to OUT_DIR/model.ckpt (its ``state_dict``, which
``model.weights`` reads, masks included), e.g. for bench/map_flatness.py.
"""

import json
import sys
import time
from functools import partial
from pathlib import Path

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


def stage_callbacks(stage: str, cfg: dict) -> list[L.Callback]:
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
        logger=False, default_root_dir=Path(out, f"sscore_{when}"), enable_progress_bar=False, inference_mode=False, callbacks=[scorer],
        limit_val_batches=1,
    )  # fmt: skip
    trainer.validate(model, datamodule=dm, verbose=False)
    return {f"sscore_{when}": scorer.result["mean"], f"focus_{when}": scorer.result["mean_focus_share"]}


def main() -> None:
    stage, ckpt, spurious, out = sys.argv[1:5]
    cfg = json.loads(sys.argv[5])
    torch.manual_seed(0)
    model = ShortcutClassifier(
        "resnet18",
        num_classes=2,
        weights=ckpt,
        backbone_kwargs=cfg.get("backbone_kwargs"),
        optimizer=partial(torch.optim.AdamW, lr=cfg.get("lr", 1e-3), weight_decay=1e-4),
    )
    seed = cfg.get("seed", 0)
    dm = SyntheticShortcuts(
        spurious=spurious, image_size=cfg.get("image_size", 32), batch_size=64, seed=seed, data_seed=seed,
        sampler=cfg.get("sampler", "default"),
        train_split=cfg.get("train_split", "train") if stage == "finetune" else "train",
    )  # fmt: skip
    callbacks = stage_callbacks(stage, cfg)
    sscores = sscore_summary(model, dm, out, "before") if cfg.get("sscore") else {}
    validate = bool(cfg.get("prusc", {}).get("monitor"))
    start = time.time()
    trainer = L.Trainer(
        max_epochs=cfg.get("epochs", 3), default_root_dir=out, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, callbacks=[GroupMetrics(print_table=False), *callbacks], limit_val_batches=None if validate else 0,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    tested = json.loads(Path(out, "metrics.json").read_text())
    if cfg.get("save"):
        torch.save({"state_dict": model.state_dict()}, Path(out, "model.ckpt"))
    if sscores:
        sscores.update(sscore_summary(model, dm, out, "after"))
    report = getattr(callbacks[0], "report", {}) if callbacks else {}
    best = report.get("best")
    fixed = report.get("fixed", {}).get("test")
    pruned = {k: round(v, 3) for k, v in report.get("densities", {}).items()}
    groups = {k: round(v["acc"], 3) for k, v in tested["groups"].items()}
    print(
        "RESULT", stage, json.dumps(cfg), "wga", round(tested["wga"], 3), "mean", round(tested["mean"], 3),
        groups, {k: v for k, v in pruned.items() if k.startswith("Prune")}, f"{time.time() - start:.0f}s",
        *(f"{k} {v:.3f}" for k, v in sscores.items()), *([f"best epoch {best['epoch']}"] if best else []),
        *([f"fixed wga {fixed['wga']:.3f} mean {fixed['mean']:.3f}"] if fixed else []),
        flush=True,
    )  # fmt: skip


if __name__ == "__main__":
    main()
