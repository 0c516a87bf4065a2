"""GroupDRO: the exponentiated-gradient weights by hand, the loss seam, resume, bad input, DDP."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from shortcut_lightning import GroupDRO, ShortcutClassifier, SyntheticShortcuts, weighted_loss
from shortcut_lightning.errors import ShortcutError

from helpers import make_trainer

FAKE_TRAINER = SimpleNamespace(current_epoch=0, world_size=1)
FAKE_MODULE = SimpleNamespace(log=lambda *a, **k: None)


def _ready(dro: GroupDRO, counts: list[float]) -> GroupDRO:
    """The state on_fit_start would give it, for a train split with these group counts, then the first
    epoch's start (the stage's lifecycle: it weights from ``start_epoch`` on)."""
    dro.q = torch.full((len(counts),), 1 / len(counts))
    dro._bonus = dro.adjustment / torch.tensor(counts).sqrt()
    dro._names = [f"g{i}" for i in range(len(counts))]
    dro.on_train_epoch_start(FAKE_TRAINER, FAKE_MODULE)
    return dro


def test_weights_follow_the_exponentiated_gradient_step_on_a_two_group_batch():
    losses, groups = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 0, 1, 1])
    dro = _ready(GroupDRO(step_size=0.1), [4, 4])
    weights = dro.sample_weights(FAKE_TRAINER, FAKE_MODULE, {"group": groups}, losses)
    # group losses 1.5 and 3.5: q is proportional to 0.5 e^0.15 and 0.5 e^0.35
    q1 = math.exp(0.35) / (math.exp(0.15) + math.exp(0.35))
    assert dro.q.tolist() == pytest.approx([1 - q1, q1])
    assert weights.tolist() == pytest.approx([(1 - q1) / 2, (1 - q1) / 2, q1 / 2, q1 / 2])
    assert float((weights * losses).sum()) == pytest.approx((1 - q1) * 1.5 + q1 * 3.5)
    # the next step starts from the updated q
    dro.sample_weights(FAKE_TRAINER, FAKE_MODULE, {"group": groups}, losses)
    q2 = (q1 * math.exp(0.35)) / ((1 - q1) * math.exp(0.15) + q1 * math.exp(0.35))
    assert dro.q[1].item() == pytest.approx(q2) and dro.steps == 2


def test_group_adjustment_and_absent_groups():
    losses, groups = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1])
    dro = _ready(GroupDRO(step_size=0.1, adjustment=2.0), [4, 1, 9])
    dro.sample_weights(FAKE_TRAINER, FAKE_MODULE, {"group": groups}, losses)
    # C / sqrt(n): 1, 2 and 2/3; group 2 is absent from the batch and keeps its exponent at 0
    raw = [math.exp(0.1 * (1.5 + 1.0)), math.exp(0.1 * (3.0 + 2.0)), 1.0]
    assert dro.q.tolist() == pytest.approx([r / sum(raw) for r in raw])


def test_plain_mean_before_start_epoch_and_without_the_callback():
    dro = _ready(GroupDRO(start_epoch=2), [1, 1])
    assert (
        dro.sample_weights(FAKE_TRAINER, FAKE_MODULE, {"group": torch.tensor([0, 1])}, torch.ones(2)) is None
    )
    module = SimpleNamespace(_trainer=None)
    assert weighted_loss(module, {}, torch.tensor([1.0, 3.0])).item() == 2.0


def test_fit_logs_q_per_group_and_resumes_it(tmp_path):
    torch.manual_seed(0)
    dm = SyntheticShortcuts(n_train=64, n_val=16, n_test=16, image_size=32, batch_size=16)
    dro = GroupDRO(step_size=0.05)
    trainer = make_trainer(tmp_path, [dro], max_epochs=1, enable_checkpointing=True)
    trainer.fit(ShortcutClassifier("test_resnet"), datamodule=dm)
    assert dro.steps == 4 and dro.q.sum().item() == pytest.approx(1.0)
    assert not torch.allclose(dro.q, torch.full_like(dro.q, 0.25))  # it moved towards some group
    logged = {k for k in trainer.callback_metrics if k.startswith("groupdro/q/")}
    assert logged == {f"groupdro/q/{name}" for name in dm.group_names}
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    again = GroupDRO(step_size=0.05)
    again.load_state_dict(next(v for k, v in saved.items() if k.startswith("GroupDRO")))
    assert torch.equal(again.q, dro.q) and again.steps == 4


def test_bad_input_names_the_field(tmp_path):
    for kwargs, match in (
        ({"step_size": 0.0}, "step_size must be > 0"),
        ({"adjustment": -1.0}, r"adjustment \(C\) must be >= 0"),
        ({"start_epoch": -1}, "start_epoch must be >= 0"),
    ):
        with pytest.raises(ShortcutError, match=match):
            GroupDRO(**kwargs)
    dm = SyntheticShortcuts(n_train=16, n_val=8, n_test=8, image_size=32, batch_size=8)

    class Plain(L.LightningDataModule):
        def train_dataloader(self):
            return dm.train_dataloader()

    dm.setup("fit")
    with pytest.raises(ShortcutError, match=r"GroupDRO needs a datamodule of shortcut_lightning\.data"):
        make_trainer(tmp_path, [GroupDRO()], max_epochs=1).fit(
            ShortcutClassifier("test_resnet"), datamodule=Plain()
        )


class TinyLinear(L.LightningModule):
    """A module of yours, without BatchNorm (so one process and two see the same losses): the two seam lines."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3 * 32 * 32, 2)

    def training_step(self, batch, batch_idx):
        logits = self.fc(batch["image"].flatten(1))
        losses = torch.nn.functional.cross_entropy(logits, batch["target"], reduction="none")
        return weighted_loss(self, batch, losses)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class _Dump(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer, pl_module) -> None:
        dro = next(cb for cb in trainer.callbacks if isinstance(cb, GroupDRO))
        out = {"q": dro.q.tolist(), "w": pl_module.fc.weight.detach().flatten()[:50].tolist()}
        with open(f"{self.path}/rank{trainer.global_rank}.json", "w") as f:
            json.dump(out, f)


def _one_step(tmp_path, devices: int) -> dict:
    tmp_path.mkdir(parents=True)
    # 16 training samples in one global step: one batch of 16, or 8 on each of 2 ranks
    dm = SyntheticShortcuts(n_train=16, n_val=8, n_test=8, image_size=32, batch_size=16 // devices)
    ddp = {"strategy": "ddp_spawn", "devices": 2} if devices > 1 else {}
    callbacks = [GroupDRO(step_size=0.5), _Dump(str(tmp_path))]
    make_trainer(tmp_path, callbacks, limit_train_batches=1, limit_val_batches=0, **ddp).fit(
        TinyLinear(), datamodule=dm
    )
    return {p.name: json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")}


def test_ddp_gives_the_q_and_the_step_of_one_process(tmp_path):
    one = _one_step(tmp_path / "one", 1)["rank0.json"]
    two = _one_step(tmp_path / "two", 2)
    assert two["rank0.json"] == two["rank1.json"]
    assert two["rank0.json"]["q"] == pytest.approx(one["q"], abs=1e-6)
    assert two["rank0.json"]["w"] == pytest.approx(one["w"], abs=1e-6)
    assert max(one["q"]) > 0.26  # the step did move q
