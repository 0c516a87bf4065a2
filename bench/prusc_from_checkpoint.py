"""PruSC mask learning from an ERM checkpoint, as in the ablation table of docs/results.md (not part of CI).

    python bench/prusc_from_checkpoint.py CKPT {background|patch|both} OUT_DIR 'JSON'

JSON keys: "prusc" (MaskPruning arguments), "epochs" (default 3), "lr" (AdamW of the module, default 1e-3),
"seed" (data seed, default 0), "batch_size" (64), "backbone_kwargs". The checkpoint is loaded as
``model.weights``; mask learning starts at epoch 0 and a RESULT line is printed after the test.
"""

import json
import sys
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch

from shortcut_lightning import ShortcutClassifier
from shortcut_lightning.callbacks import GroupMetrics, MaskPruning
from shortcut_lightning.data import SyntheticShortcuts

ckpt, spurious, out = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = json.loads(sys.argv[4])
torch.manual_seed(0)
model = ShortcutClassifier(
    "resnet18",
    num_classes=2,
    weights=ckpt,
    backbone_kwargs=cfg.get("backbone_kwargs"),
    optimizer=partial(torch.optim.AdamW, lr=cfg.get("lr", 1e-3), weight_decay=1e-4),
)
dm = SyntheticShortcuts(
    spurious=spurious,
    image_size=32,
    batch_size=cfg.get("batch_size", 64),
    seed=cfg.get("seed", 0),
    data_seed=cfg.get("seed", 0),
)
pr = MaskPruning(**cfg.get("prusc", {}))
t = time.time()
trainer = L.Trainer(
    max_epochs=cfg.get("epochs", 3),
    default_root_dir=out,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    callbacks=[GroupMetrics(print_table=False), pr],
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
    {k: round(v, 3) for k, v in pr.report["densities"].items() if k.startswith("Prune")},
    f"{time.time() - t:.0f}s",
    flush=True,
)
