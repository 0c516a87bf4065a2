"""SCORE's speed (``python -m bench speed --only score``): a regularized epoch against a plain ERM epoch through the
same Lightning stack, and the mining (2 classes x 100 samples) against one ERM epoch on the default training set."""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import lightning as L

from bench.speed_epochs import lightning_epoch, make_data, make_model, plain_epoch
from shortcut_lightning import SyntheticShortcuts


class _TimedMining:
    """Wraps a mining stage's ``mine`` and keeps its wall time."""

    def __init__(self, mine: Any) -> None:
        self.mine, self.seconds = mine, 0.0

    def __call__(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        start = time.perf_counter()
        result = self.mine(trainer, pl_module)
        self.seconds = time.perf_counter() - start
        return result


def _masked_logit_epoch(dm: SyntheticShortcuts, backbone: str, device: str) -> float:
    """An epoch with the masked-logit penalty (its pairs from a small mining at the epoch's start), less the
    mining's own time."""
    from shortcut_lightning.callbacks import NeuronRegularization, SpuriousPositiveMining

    mining = SpuriousPositiveMining(
        top_m=16, num_selected=8, n_confusers=4, require_masked_prediction=False, report_splits=()
    )
    timed = _TimedMining(mining.mine)
    mining.mine = timed
    reg = NeuronRegularization(penalty="masked_logit", regularize_on="pairs", pairs_per_step=16)
    return lightning_epoch(dm, backbone, device, (mining, reg)) - timed.seconds


def bench_score(backbone: str, device: str, repeats: int, n: int, size: int) -> dict[str, Any]:
    """SCORE: regularized vs plain epoch (same stack, alternating); mining vs one ERM epoch."""
    from shortcut_lightning.callbacks import NeuronRegularization, SpuriousPositiveMining

    dm = make_data(n, size)
    lightning_epoch(dm, backbone, device)  # warm-up
    plain, regularized, contribution, masked = [], [], [], []
    for _ in range(repeats):
        plain.append(lightning_epoch(dm, backbone, device))
        reg = NeuronRegularization(neurons=list(range(10)), layer="net.layer4", strength=1.0)
        regularized.append(lightning_epoch(dm, backbone, device, (reg,)))
        reg = NeuronRegularization(
            neurons=list(range(10)), layer="net.layer4", penalty="contribution", regularize_on="all"
        )
        contribution.append(lightning_epoch(dm, backbone, device, (reg,)))
        masked.append(_masked_logit_epoch(dm, backbone, device))
    full = SyntheticShortcuts()
    full.setup("fit")
    epoch_s, _ = plain_epoch(full, backbone, device)
    mining = SpuriousPositiveMining(top_m=100, report_splits=())
    timed = _TimedMining(mining.mine)
    mining.mine = timed
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        callbacks=[mining],
        accelerator=device,
        devices=1,
        default_root_dir=tempfile.mkdtemp(prefix="score_bench_"),
    )
    trainer.fit(make_model(backbone), datamodule=full)
    erm, reg_s = statistics.median(plain), statistics.median(regularized)
    contribution_s, masked_s = statistics.median(contribution), statistics.median(masked)
    return {
        "benchmark": "SCORE: regularized epoch vs ERM epoch (Lightning, alternating); mining vs one ERM epoch",
        "backbone": backbone,
        "n": n,
        "image_size": size,
        "device": device,
        "erm_epoch_s": erm,
        "regularized_epoch_s": reg_s,
        "step_ratio": reg_s / erm,
        "step_target": "<= 1.10",
        "runs_erm_s": plain,
        "runs_regularized_s": regularized,
        # issue 43's penalties (all 2 classes, 10 neurons at layer4): the contribution's second backward, and
        # masked_logit's extra eval forward of 16 masked images a step (its epoch less the mining's time)
        "contribution_epoch_s": contribution_s,
        "contribution_ratio": contribution_s / erm,
        "masked_logit_epoch_s": masked_s,
        "masked_logit_ratio": masked_s / erm,
        "runs_contribution_s": contribution,
        "runs_masked_logit_s": masked,
        "mining_s": timed.seconds,
        "erm_epoch_full_train_s": epoch_s,
        "n_train": len(full.dataset("train")),
        "mining_ratio": timed.seconds / epoch_s,
        "mining_target": "<= 1 (2 classes x 100 samples)",
    }
