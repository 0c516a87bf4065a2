"""Speed of the baseline stages against ERM, in one run (``python -m bench speed --only baselines``).

A GroupDRO step (per-sample losses, the group weights' update and all-reduce) and a JTT step (ERM on the
up-weighted draw, error set built before the timed epoch) against a plain ERM step: whole Lightning epochs
of the same model, data and optimizer, alternating, the fastest run of each (other load only adds time).
Target <= 1.05. JTT's identification pass (the training split predicted once) is reported beside it as a
fraction of an ERM epoch.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from torch import Tensor

from bench.speed_epochs import lightning_epoch, make_data
from shortcut_lightning import GroupDRO, JustTrainTwice


class TimedJTT(JustTrainTwice):
    """JTT that keeps the wall time of its identification pass."""

    identify_s = 0.0

    def identify(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Tensor:
        start = time.perf_counter()
        errors = super().identify(trainer, pl_module)
        self.identify_s = time.perf_counter() - start
        return errors


def bench_baselines(backbone: str, device: str, repeats: int, n: int, size: int) -> dict[str, Any]:
    """GroupDRO and JTT epochs against an ERM epoch, alternating, the fastest run of each."""
    dm = make_data(n, size)
    lightning_epoch(dm, backbone, device)  # warm-up
    runs: dict[str, list[float]] = {"erm": [], "groupdro": [], "jtt": []}
    identify = []
    for _ in range(repeats):
        runs["erm"].append(lightning_epoch(dm, backbone, device))
        runs["groupdro"].append(lightning_epoch(dm, backbone, device, (GroupDRO(),)))
        # equal-length epochs, so the epoch ratio is the step ratio ("upsample" steps cost the same; its
        # epochs are longer by design)
        jtt = TimedJTT(identify_epochs=0, upweight=20.0, draw="reweight")
        runs["jtt"].append(lightning_epoch(dm, backbone, device, (jtt,)))
        identify.append(jtt.identify_s)
    erm = min(runs["erm"])
    return {
        "benchmark": "GroupDRO and JTT epochs vs an ERM epoch (Lightning stack, same model and data)",
        "backbone": backbone,
        "n": n,
        "image_size": size,
        "device": device,
        "erm_epoch_s": erm,
        "groupdro_epoch_s": min(runs["groupdro"]),
        "jtt_epoch_s": min(runs["jtt"]),
        "groupdro_ratio": min(runs["groupdro"]) / erm,
        "jtt_ratio": min(runs["jtt"]) / erm,
        "jtt_identify_s": min(identify),
        "jtt_identify_ratio": min(identify) / erm,
        "runs_s": runs,
        "target": "<= 1.05",
    }
