"""Speed ratios measured in one run (not part of CI). ``make bench`` runs it.

ERM epoch through the Lightning stack (ShortcutClassifier + Trainer, progress bar and logging on)
vs a plain PyTorch loop over the same model, data, batches and optimizer. Runs alternate and the
median of each is compared, so machine noise hits both sides alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from shortcut_lightning import ShortcutClassifier, SyntheticShortcuts

OUT = Path(__file__).resolve().parent / "results"


def make_data(n: int, size: int) -> SyntheticShortcuts:
    dm = SyntheticShortcuts(n_train=n, n_val=64, n_test=64, image_size=size, batch_size=64)
    dm.setup("fit")
    return dm


def make_model(backbone: str) -> ShortcutClassifier:
    torch.manual_seed(0)
    return ShortcutClassifier(backbone, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-4))


def plain_epoch(dm: SyntheticShortcuts, backbone: str, device: str) -> float:
    model = make_model(backbone).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)
    start = time.perf_counter()
    for batch in loader:
        x, y = batch["image"].to(device), batch["target"].to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


class EpochTimer(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def lightning_epoch(dm: SyntheticShortcuts, backbone: str, device: str) -> float:
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_model_summary=False, callbacks=[timer], accelerator=device, devices=1,
    )  # fmt: skip
    trainer.fit(make_model(backbone), datamodule=dm)
    return timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--n", type=int, default=1280, help="training samples per epoch")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dm = make_data(args.n, args.image_size)
    plain_epoch(dm, args.backbone, device)  # warm-up
    plain, light = [], []
    for _ in range(args.repeats):
        plain.append(plain_epoch(dm, args.backbone, device))
        light.append(lightning_epoch(dm, args.backbone, device))
    result = {
        "benchmark": "ERM epoch, Lightning stack vs plain PyTorch loop",
        "backbone": args.backbone, "n": args.n, "image_size": args.image_size, "device": device,
        "plain_s": statistics.median(plain), "lightning_s": statistics.median(light),
        "ratio": statistics.median(light) / statistics.median(plain), "target": "<= 1.05",
        "runs_plain_s": plain, "runs_lightning_s": light,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "lightning": L.__version__,
    }  # fmt: skip
    OUT.mkdir(exist_ok=True)
    (OUT / f"speed_{device}.json").write_text(json.dumps(result, indent=2))
    print(f"\nERM epoch ({args.backbone}, {args.n} images at {args.image_size}px, {device})")
    print(f"plain loop     {result['plain_s']:.2f} s")
    print(f"Lightning      {result['lightning_s']:.2f} s")
    print(f"ratio          {result['ratio']:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
