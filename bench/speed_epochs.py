"""Epochs to time: a plain PyTorch loop and the Lightning stack over the same model, data and optimizer; and the
ERM benchmark (``python -m bench speed --only erm``): Lightning's overhead and ``FiniteLoss``'s per-step check."""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from shortcut_lightning import FiniteLoss, ShortcutClassifier, SyntheticShortcuts


def make_data(n: int, size: int) -> SyntheticShortcuts:
    """``n`` training images of the embedded benchmark at ``size`` px, set up."""
    dm = SyntheticShortcuts(n_train=n, n_val=64, n_test=64, image_size=size, batch_size=64)
    dm.setup("fit")
    return dm


def make_model(backbone: str) -> ShortcutClassifier:
    """The same initial model every time (seed 0), with AdamW."""
    torch.manual_seed(0)
    return ShortcutClassifier(backbone, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-4))


def plain_epoch(dm: SyntheticShortcuts, backbone: str, device: str) -> tuple[float, ShortcutClassifier]:
    """Seconds of one epoch of a plain PyTorch loop, and the model it trained."""
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
    return time.perf_counter() - start, model


class EpochTimer(L.Callback):
    """The wall time of the training epoch."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def lightning_epoch(dm: SyntheticShortcuts, backbone: str, device: str, callbacks: tuple = ()) -> float:
    """Seconds of one training epoch through the Lightning stack, with ``callbacks`` attached."""
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[timer, *callbacks],
        accelerator=device,
        devices=1,
        default_root_dir=tempfile.mkdtemp(prefix="epoch_bench_"),  # stage reports (jtt.json) land there
    )
    trainer.fit(make_model(backbone), datamodule=dm)
    return timer.seconds


def bench_erm(backbone: str, device: str, repeats: int, n: int, size: int) -> dict[str, Any]:
    """An ERM epoch through the Lightning stack against a plain loop, and with ``FiniteLoss`` against without;
    alternating, the fastest run of each (other load on a shared machine only adds time)."""
    dm = make_data(n, size)
    plain_epoch(dm, backbone, device)  # warm-up
    plain, light, checked = [], [], []
    for _ in range(repeats):
        plain.append(plain_epoch(dm, backbone, device)[0])
        light.append(lightning_epoch(dm, backbone, device))
        checked.append(lightning_epoch(dm, backbone, device, (FiniteLoss(),)))
    return {
        "benchmark": "ERM epoch, Lightning stack vs plain PyTorch loop",
        "backbone": backbone,
        "n": n,
        "image_size": size,
        "device": device,
        "plain_s": min(plain),
        "lightning_s": min(light),
        "ratio": min(light) / min(plain),
        "target": "<= 1.05",
        "ratio_of_medians": statistics.median(light) / statistics.median(plain),
        "runs_plain_s": plain,
        "runs_lightning_s": light,
        "finite_loss_s": min(checked),
        "finite_loss_ratio": min(checked) / min(light),
        "runs_finite_loss_s": checked,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "lightning": L.__version__,
    }
