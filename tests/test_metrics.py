"""GroupAccuracy against a brute-force count, empty groups, and DDP (2 gloo processes) vs one process."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shortcut_lightning.metrics import GroupAccuracy, format_group_table, group_report


def brute_force(preds, target, groups, num_groups, num_classes, train_counts):
    per_class = num_groups // num_classes
    acc, n = {}, {}
    for g in range(num_groups):
        idx = [i for i in range(len(groups)) if groups[i] == g]
        n[g] = len(idx)
        acc[g] = sum(int(preds[i] == target[i]) for i in idx) / len(idx) if idx else None
    present = [g for g in acc if acc[g] is not None]
    class_acc = {}
    for c in range(num_classes):
        idx = [i for i in range(len(groups)) if groups[i] // per_class == c]
        if idx:
            class_acc[c] = sum(int(preds[i] == target[i]) for i in idx) / len(idx)
    w = {g: train_counts[g] for g in present}
    return {
        "acc": acc,
        "n": n,
        "wga": min(acc[g] for g in present),
        "mean": sum(int(p == t) for p, t in zip(preds, target, strict=True)) / len(preds),
        "weighted_mean": sum(w[g] * acc[g] for g in present) / sum(w.values()),
        "worst_class": min(class_acc.values()),
        "balanced": sum(class_acc.values()) / len(class_acc),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_with_empty_groups(seed):
    g = torch.Generator().manual_seed(seed)
    num_groups, num_classes, n = 6, 2, 200
    groups = torch.randint(0, num_groups, (n,), generator=g)
    groups[groups == 4] = 5  # group 4 is empty
    target = groups // 3
    logits = torch.randn(n, num_classes, generator=g)
    train_counts = torch.tensor([50, 5, 7, 40, 0, 3])
    metric = GroupAccuracy(num_groups, num_classes, train_counts)
    for chunk in range(0, n, 33):  # several updates
        metric.update(logits[chunk : chunk + 33], target[chunk : chunk + 33], groups[chunk : chunk + 33])
    got = metric.compute()
    want = brute_force(
        logits.argmax(1).tolist(),
        target.tolist(),
        groups.tolist(),
        num_groups,
        num_classes,
        train_counts.tolist(),
    )
    for gid in range(num_groups):
        if want["acc"][gid] is None:
            assert math.isnan(got["group_acc"][gid])
        else:
            assert got["group_acc"][gid].item() == pytest.approx(want["acc"][gid])
        assert got["group_n"][gid].item() == want["n"][gid]
    for key in ("wga", "mean", "weighted_mean", "worst_class", "balanced"):
        assert got[key].item() == pytest.approx(want[key]), key


def test_report_skips_empty_groups_and_formats():
    metric = GroupAccuracy(4, 2)
    metric.update(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]), torch.tensor([0, 0, 3]))
    report = group_report(metric.compute(), ["a", "b", "c", "d"], "test")
    assert report["groups"]["b"] == {"acc": None, "n": 0}
    assert report["wga"] == 1.0 and report["weighted_mean"] is None
    table = format_group_table({"acc": report})
    assert "b" in table and "wga" in table


def test_all_wrong_group_is_worst():
    metric = GroupAccuracy(4, 2)
    metric.update(torch.tensor([0, 1, 0, 0]), torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 2, 3]))
    out = metric.compute()
    assert out["wga"].item() == 0.0 and out["mean"].item() == 0.25


def test_rejects_out_of_range_groups():
    metric = GroupAccuracy(4, 2)
    with pytest.raises(ValueError, match="group ids"):
        metric.update(torch.tensor([0]), torch.tensor([0]), torch.tensor([7]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, data, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    logits, target, groups, counts = data
    metric = GroupAccuracy(6, 2, counts)
    metric.update(logits[rank::world], target[rank::world], groups[rank::world])  # uneven shards
    result = metric.compute()
    if rank == 0:
        torch.save({k: v.clone() for k, v in result.items()}, out)
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_two_processes_equal_one_process(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = 101
    groups = torch.randint(0, 6, (n,), generator=g)
    data = (torch.randn(n, 2, generator=g), groups // 3, groups, torch.tensor([9, 1, 2, 8, 3, 1]))
    single = GroupAccuracy(6, 2, data[3])
    single.update(*data[:3])
    want = single.compute()
    out = tmp_path / "rank0.pt"
    mp.start_processes(_worker, args=(2, _free_port(), data, str(out)), nprocs=2, start_method="spawn")
    got = torch.load(out)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, equal_nan=True, msg=key)
