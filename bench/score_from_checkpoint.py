"""SCORE fine-tuning from an ERM checkpoint, as measured in docs/results.md (not part of CI).

    python bench/score_from_checkpoint.py CKPT {background|patch} OUT_DIR 'JSON'

JSON keys: "mining" (SpuriousPositiveMining arguments), "reg" (NeuronRegularization arguments),
"mining_file" (reuse a mining.json instead of mining; with "reg": {"strength": 0.0} this is the
continued-ERM control), "lr" (AdamW, default 1e-3), "epochs" (default 3), "seed" (data seed, default 0),
"backbone_kwargs" (e.g. {"output_stride": 8} for checkpoints of configs/synthetic_sscore.yaml).
Mining runs at epoch 0; the model is tested after the fine-tuning and a RESULT line is printed.
"""

import json
import sys
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch

from shortcut_lightning import ShortcutClassifier
from shortcut_lightning.callbacks import GroupMetrics, NeuronRegularization, SpuriousPositiveMining
from shortcut_lightning.data import SyntheticShortcuts

ckpt, spurious, out = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = json.loads(sys.argv[4])
torch.manual_seed(0)
model = ShortcutClassifier(
    "resnet18",
    num_classes=2,
    backbone_kwargs=cfg.get("backbone_kwargs"),
    optimizer=partial(torch.optim.AdamW, lr=cfg.get("lr", 1e-3), weight_decay=1e-4),
)
model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"])
dm = SyntheticShortcuts(
    spurious=spurious, image_size=32, batch_size=64, seed=cfg.get("seed", 0), data_seed=cfg.get("seed", 0)
)
mining_kw = cfg.get("mining", {})
cbs = [GroupMetrics(print_table=False)]
if "mining_file" in cfg:
    cbs.append(NeuronRegularization(mining_file=cfg["mining_file"], **cfg.get("reg", {})))
else:
    cbs += [
        SpuriousPositiveMining(report_splits=("test",), **mining_kw),
        NeuronRegularization(**cfg.get("reg", {})),
    ]
t = time.time()
trainer = L.Trainer(
    max_epochs=cfg.get("epochs", 3),
    default_root_dir=out,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    callbacks=cbs,
    limit_val_batches=0,
)
trainer.fit(model, datamodule=dm)
trainer.test(model, datamodule=dm, verbose=False)
m = json.loads(Path(out, "metrics.json").read_text())
print(
    "RESULT",
    json.dumps(cfg),
    "wga",
    round(m["wga"], 3),
    "mean",
    round(m["mean"], 3),
    {k: round(v["acc"], 3) for k, v in m["groups"].items()},
    f"{time.time() - t:.0f}s",
    flush=True,
)
