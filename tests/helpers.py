"""Callbacks used by tests; module-level so DDP spawn and subprocesses can import them."""

from __future__ import annotations

import json
import os
import signal
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, default_collate

from shortcut_lightning.callbacks import BatchNormRecalibration, DeepFeatureReweighting
from shortcut_lightning.data import SyntheticShortcuts


class SquaredLogitPenalty(Callback):
    """A penalty provider for the seam test: weight * mean squared logit."""

    penalty_name = "probe"

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = weight

    def training_penalty(self, trainer, pl_module, batch, outputs):
        return self.weight * outputs["logits"].pow(2).mean()


class GradCapture(Callback):
    """Keeps the head's gradient after the first backward."""

    def __init__(self) -> None:
        self.grad = None

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.grad is None:
            self.grad = pl_module.head.weight.grad.detach().clone()


class KillAt(Callback):
    """SIGKILLs its own process at a given epoch and batch: a crash with no chance to clean up."""

    def __init__(self, epoch: int = 1, batch: int = 2) -> None:
        self.epoch = epoch
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


def head_norm(model: torch.nn.Module) -> float:
    return float(model.head.weight.norm())


class PlainResNet(L.LightningModule):
    """A LightningModule that knows nothing of shortcut_lightning: torchvision ResNet-18, CE loss."""

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        self.net = torchvision.models.resnet18(num_classes=2)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch["image"]), batch["target"])

    def validation_step(self, batch, batch_idx):
        return self(batch["image"])

    def test_step(self, batch, batch_idx):
        return self(batch["image"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _drop_group(samples):
    batch = default_collate(samples)
    batch.pop("group")
    return batch


class NoGroupSynthetic(SyntheticShortcuts):
    """Synthetic data whose batches carry no group labels (as if unannotated)."""

    def dataloader(self, split, augment=False, shuffle=False, sampler=None):
        loader = super().dataloader(split, augment, shuffle, sampler)
        return DataLoader(
            loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler, collate_fn=_drop_group
        )


class MaskDump(Callback):
    """Saves every rank's hard masks, MaskPruning clusters, weights and drawn sample indices (by epoch) at the
    end of fit (listed before MaskPruning: the state before its end; after it: the masks exported and the
    state ``finetune_keep`` kept, named in ``finetune_best``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.drawn: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.drawn.setdefault(trainer.current_epoch, []).extend(batch["index"].tolist())

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from shortcut_lightning.callbacks import MaskPruning
        from shortcut_lightning.methods.prusc.masks import model_masks

        pruning = next(cb for cb in trainer.callbacks if isinstance(cb, MaskPruning))
        masks = {name: mask.hard() for name, mask in model_masks(pl_module).items()}
        logits = {name: mask.logits.detach().clone() for name, mask in model_masks(pl_module).items()}
        os.makedirs(self.path, exist_ok=True)
        torch.save(
            {
                "masks": masks,
                "logits": logits,
                "clusters": pruning.clusters,
                "drawn": self.drawn,
                "finetune_best": pruning.report.finetune_best if pruning.report else None,
                "weights": {
                    k: v.detach().clone() for k, v in pl_module.state_dict().items() if "logits" not in k
                },
            },
            f"{self.path}/masks_rank{trainer.global_rank}.pt",
        )


class NeuronDump(Callback):
    """Saves every rank's SCORE mining rounds and penalised neurons at the end of fit (as JSON)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from shortcut_lightning.callbacks import NeuronRegularization, SpuriousPositiveMining

        mining = next(cb for cb in trainer.callbacks if isinstance(cb, SpuriousPositiveMining))
        reg = next(cb for cb in trainer.callbacks if isinstance(cb, NeuronRegularization))
        os.makedirs(self.path, exist_ok=True)
        with open(f"{self.path}/neurons_rank{trainer.global_rank}.json", "w") as f:
            json.dump({"rounds": mining.result.to_dict()["rounds"], "penalised": reg.neurons}, f)


class WeightDump(Callback):
    """Saves every rank's parameters and SCORE pair indices at the end of fit (``weights_rank<r>.pt``)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from shortcut_lightning.callbacks import SpuriousPositiveMining

        mining = next(cb for cb in trainer.callbacks if isinstance(cb, SpuriousPositiveMining))
        os.makedirs(self.path, exist_ok=True)
        state = {
            k: v.detach().cpu() for k, v in pl_module.named_parameters()
        }  # BatchNorm buffers are per rank
        torch.save(
            {"state": state, "pairs": mining.pairs.indices},
            f"{self.path}/weights_rank{trainer.global_rank}.pt",
        )


class BatchIndices(Callback):
    """Records the sample indices of every training batch, by epoch."""

    def __init__(self) -> None:
        self.drawn: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.drawn.setdefault(trainer.current_epoch, []).extend(batch["index"].tolist())


class FailureRecordingDFR(DeepFeatureReweighting):
    """DFR that writes ``rank<N>.txt`` with the class of the error its run raised on that rank.

    Rank 0 holds ``hold_rank_zero`` seconds before raising: under ``ddp_spawn`` the other ranks are
    terminated once rank 0 exits, so a rank that fails a moment later still gets to record it.
    """

    def __init__(self, folder: str, hold_rank_zero: float = 3.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.folder = folder
        self.hold_rank_zero = hold_rank_zero

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        try:
            return super().run(trainer, pl_module)
        except Exception as error:
            with open(os.path.join(self.folder, f"rank{trainer.global_rank}.txt"), "w") as handle:
                handle.write(type(error).__name__)
            if trainer.global_rank == 0:
                time.sleep(self.hold_rank_zero)
            raise


def make_trainer(root, callbacks=(), max_epochs: int = 1, devices: int = 1, **overrides) -> L.Trainer:
    """The tests' Trainer: CPU, no logger, progress bar or checkpoints unless ``overrides`` say so; with
    ``devices`` above 1, Lightning's DDP in spawned CPU processes (gloo, ``ddp_spawn``)."""
    settings = {
        "accelerator": "cpu",
        "devices": devices,
        **({"strategy": "ddp_spawn"} if devices > 1 else {}),
        "max_epochs": max_epochs,
        "default_root_dir": root,
        "logger": False,
        "enable_progress_bar": False,
        "enable_checkpointing": False,
        "callbacks": list(callbacks),
    }
    return L.Trainer(**{**settings, **overrides})


class StatisticsSavingBN(BatchNormRecalibration):
    """BatchNorm re-estimation that saves the model's running statistics (rank 0) to ``path`` after it ran."""

    def __init__(self, path: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.path = path

    def run(self, trainer, pl_module):
        result = super().run(trainer, pl_module)
        if trainer.is_global_zero:
            buffers = {
                k: v.clone()
                for k, v in pl_module.state_dict().items()
                if k.endswith(("running_mean", "running_var"))
            }
            torch.save(buffers, self.path)
        return result
