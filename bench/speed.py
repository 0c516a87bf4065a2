"""Speed ratios, each measured against its baseline in the same run (not part of CI). ``make bench``.

- ``erm``: an ERM epoch through the Lightning stack (ShortcutClassifier + Trainer, progress bar and
  logging on) vs a plain PyTorch loop over the same model, data, batches and optimizer; and the same
  Lightning epoch with ``FiniteLoss`` (the CLI's per-step check of the loss) against it. Runs
  alternate; the ratio compares the fastest run of each side (other load on a shared machine only adds
  time, so the minimum estimates each loop's own cost, as ``timeit`` does), the ratio of medians is kept
  beside it. Target <= 1.05.
- ``dfr``: the DFR refit (C tuning + 20 refits, embeddings given) vs one ERM training epoch (plain
  loop) on the embedded default's training set, the fits in one process and in one per core. Target
  <= 0.10. AFR's refit (the (gamma, L2) grid cross-fitted, then the final fit) on the same embeddings
  against the same epoch: target <= 1.
- ``baselines``: GroupDRO and JTT epochs vs an ERM epoch (``bench/speed_baselines.py``). Target <= 1.05.
- ``sscore``: s-scores of all 512 penultimate neurons of a ResNet-18 over 50 masked samples, our
  one-pass Grad-CAM vs looping captum's LayerGradCam over the neurons (scores compared). Target >= 100x.
- ``score``: a SCORE-regularized training epoch (10 penalised neurons of layer4) vs a plain ERM epoch
  through the same Lightning stack (target <= 1.10); SCORE mining over 2 x 100 samples (ranking pass,
  LRP, masked images, auto selection) vs one ERM epoch on the default training set (target <= 1).
- ``prusc``: a PruSC mask-learning step (every conv and linear weight masked, Gumbel-sigmoid sample,
  CE + sparsity + SupCon over clusters, Adam on the logits, weights frozen) vs an ERM step (CE, AdamW on
  the weights) on the same batch, alternating; medians compared; at 32 px (batch 64), where the
  per-weight mask work dominates, and at 224 px (batch 16). Target <= 1.5.
- ``lrp``: LRP input-relevance throughput (EpsilonPlusFlat, timm canonizers, batch 32) vs forward-only
  throughput of the same model and batch (``--backbone`` at ``--lrp-size``). Target >= 0.3x.
- ``lrp_efficientnet``: the same for efficientnet_lite0 at 128 px (the pretrained regime's network:
  BatchNormAct merging, depthwise WSquare, canonized inverted-residual adds). Target >= 0.3x.
- ``attnlrp``: the same for a timm ViT (``--vit``, default vit_tiny_patch16_224 at 224 px): AttnLRP
  (ViT canonizer, LayerNorm and attention rules) vs forward-only. Target >= 0.25x.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from shortcut_lightning import FiniteLoss, ShortcutClassifier, SyntheticShortcuts
from shortcut_lightning.methods.dfr.afr_fit import fit_afr
from shortcut_lightning.methods.dfr.fit_pool import available_cores
from shortcut_lightning.methods.dfr.last_layer import C_GRID, fit_dfr
from shortcut_lightning.probing.embedding_pass import collect_embeddings

OUT = Path(__file__).resolve().parent / "results"


def make_data(n: int, size: int) -> SyntheticShortcuts:
    dm = SyntheticShortcuts(n_train=n, n_val=64, n_test=64, image_size=size, batch_size=64)
    dm.setup("fit")
    return dm


def make_model(backbone: str) -> ShortcutClassifier:
    torch.manual_seed(0)
    return ShortcutClassifier(backbone, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-4))


def plain_epoch(dm: SyntheticShortcuts, backbone: str, device: str) -> tuple[float, ShortcutClassifier]:
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
    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def lightning_epoch(dm: SyntheticShortcuts, backbone: str, device: str, callbacks: tuple = ()) -> float:
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_model_summary=False, callbacks=[timer, *callbacks], accelerator=device, devices=1,
        default_root_dir=tempfile.mkdtemp(prefix="epoch_bench_"),  # stage reports (jtt.json) land there
    )  # fmt: skip
    trainer.fit(make_model(backbone), datamodule=dm)
    return timer.seconds


def bench_dfr(backbone: str, device: str, repeats: int) -> dict:
    """DFR refit time vs one ERM epoch over the default synthetic training set (3000 images)."""
    dm = SyntheticShortcuts()
    dm.setup("fit")
    epoch_s, model = plain_epoch(dm, backbone, device)  # embeddings of the model this epoch trained
    head = model.head
    train = collect_embeddings(model, dm.dataloader("train"), head, "embedding train")
    val = collect_embeddings(model, dm.dataloader("val"), head, "embedding val")
    cores = available_cores()
    times: dict[int, list[float]] = {1: [], cores: []}
    afr_times = []
    for _ in range(repeats):
        for workers in times:
            start = time.perf_counter()
            fit_dfr(
                val.features.double().numpy(), val.target.numpy(), val.group.numpy(),
                train.features.double().numpy(), dm.num_classes, C_GRID, 20, 0, workers,
            )  # fmt: skip
            times[workers].append(time.perf_counter() - start)
        start = time.perf_counter()
        bias = head.bias.detach() if head.bias is not None else torch.zeros(head.out_features)
        fit_afr(val.features, val.logits, val.target, head.weight.detach(), bias, dm.num_classes)
        afr_times.append(time.perf_counter() - start)
    refit_s, sequential_s = min(times[cores]), min(times[1])
    return {
        "benchmark": "DFR refit (tuning + 20 fits, embeddings given) vs one ERM epoch (plain loop)",
        "backbone": backbone, "n_train": len(train), "n_refit": len(val), "features": val.features.shape[1],
        "erm_epoch_s": epoch_s, "workers": cores, "refit_s": refit_s, "runs_refit_s": times[cores],
        "sequential_refit_s": sequential_s, "runs_sequential_refit_s": times[1],
        "ratio": refit_s / epoch_s, "sequential_ratio": sequential_s / epoch_s, "target": "<= 0.10",
        "afr_refit_s": min(afr_times), "runs_afr_refit_s": afr_times, "afr_ratio": min(afr_times) / epoch_s,
        "afr_target": "<= 1",
    }  # fmt: skip


def bench_score(backbone: str, device: str, repeats: int, n: int, size: int) -> dict:
    """SCORE: regularized vs plain epoch (same stack, alternating); mining vs one ERM epoch."""
    from shortcut_lightning.callbacks import NeuronRegularization, SpuriousPositiveMining

    dm = make_data(n, size)
    lightning_epoch(dm, backbone, device)  # warm-up
    plain, regularized = [], []
    for _ in range(repeats):
        plain.append(lightning_epoch(dm, backbone, device))
        reg = NeuronRegularization(neurons=list(range(10)), layer="net.layer4", strength=1.0)
        regularized.append(lightning_epoch(dm, backbone, device, (reg,)))
    full = SyntheticShortcuts()
    full.setup("fit")
    epoch_s, _ = plain_epoch(full, backbone, device)
    mining = SpuriousPositiveMining(top_m=100, report_splits=())
    timed: dict[str, float] = {}
    mine = mining.mine

    def timed_mine(trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        start = time.perf_counter()
        result = mine(trainer, pl_module)
        timed["mining_s"] = time.perf_counter() - start
        return result

    mining.mine = timed_mine
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, callbacks=[mining], accelerator=device, devices=1,
        default_root_dir=tempfile.mkdtemp(prefix="score_bench_"),
    )  # fmt: skip
    trainer.fit(make_model(backbone), datamodule=full)
    return {
        "benchmark": "SCORE: regularized epoch vs ERM epoch (Lightning, alternating); mining vs one ERM epoch",
        "backbone": backbone, "n": n, "image_size": size, "device": device,
        "erm_epoch_s": statistics.median(plain), "regularized_epoch_s": statistics.median(regularized),
        "step_ratio": statistics.median(regularized) / statistics.median(plain), "step_target": "<= 1.10",
        "runs_erm_s": plain, "runs_regularized_s": regularized,
        "mining_s": timed["mining_s"], "erm_epoch_full_train_s": epoch_s, "n_train": len(full.dataset("train")),
        "mining_ratio": timed["mining_s"] / epoch_s, "mining_target": "<= 1 (2 classes x 100 samples)",
    }  # fmt: skip


def bench_sscore(n_neurons: int | None) -> dict:
    """Our one-pass s-score vs captum's LayerGradCam looped over neurons, same samples, same scoring."""
    from captum.attr import LayerGradCam

    from shortcut_lightning.xai.gradcam import neuron_gradcam, spurious_scores

    dm = SyntheticShortcuts()
    ds = dm.dataset("train")
    samples = [ds[i] for i in range(50)]
    x = torch.stack([s["image"] for s in samples])
    masks = torch.stack([s["mask"] for s in samples])
    model = make_model("resnet18").eval()
    net = model.net
    neurons = torch.arange(n_neurons or model.head.in_features)
    start = time.perf_counter()
    maps = neuron_gradcam(model, x, net.layer4, model.head, neurons)
    ours = spurious_scores(maps.maps, masks, alpha=0.5)
    ours_s = time.perf_counter() - start
    captum = LayerGradCam(lambda t: net.forward_head(net.forward_features(t), pre_logits=True), net.layer4)
    start = time.perf_counter()
    theirs = torch.stack([
        spurious_scores(captum.attribute(x, target=int(i), relu_attributions=True).detach(), masks, alpha=0.5)[0]
        for i in neurons
    ])  # fmt: skip
    captum_s = time.perf_counter() - start
    return {
        "benchmark": "s-score of penultimate neurons: one-pass Grad-CAM vs captum LayerGradCam per neuron",
        "backbone": "resnet18", "samples": len(x), "image_size": x.shape[-1], "neurons": len(neurons),
        "ours_s": ours_s, "captum_s": captum_s, "speedup": captum_s / ours_s, "target": ">= 100",
        "max_abs_score_difference": float((ours - theirs).abs().max()),
    }  # fmt: skip


def bench_lrp(
    backbone: str, image_size: int, repeats: int, goal: str = ">= 0.3", device: str = "cpu", batch: int = 32
) -> dict:
    """Images per second: LRP input relevance vs a plain forward, same model, same batch (alternating, medians)."""
    from shortcut_lightning.xai import relevance

    model = make_model(backbone).to(device).eval()
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    target = torch.zeros(batch, dtype=torch.long, device=device)

    def forward() -> None:
        with torch.no_grad():
            model(x)
        if device == "cuda":
            torch.cuda.synchronize()

    def lrp() -> None:
        relevance(model, x, target)
        if device == "cuda":
            torch.cuda.synchronize()

    runs: dict[str, list[float]] = {"forward": [], "lrp": []}
    forward(), lrp()  # warm-up
    for _ in range(repeats):  # alternating, so machine noise hits both alike
        for name, fn in (("forward", forward), ("lrp", lrp)):
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    timings = {name: statistics.median(values) for name, values in runs.items()}
    return {
        "benchmark": f"LRP input relevance vs forward-only throughput (batch {batch})",
        "backbone": backbone, "image_size": image_size, "batch": batch, "device": device,
        "forward_img_per_s": batch / timings["forward"], "lrp_img_per_s": batch / timings["lrp"],
        "ratio": timings["forward"] / timings["lrp"], "target": goal,
    }  # fmt: skip


def bench_prusc(backbone: str, device: str, steps: int, size: int, batch: int = 64) -> dict:
    """Mask-learning step vs ERM step on one batch (the callback's loss pieces, timed step by step)."""
    from shortcut_lightning.methods.prusc.masks import attach_masks
    from shortcut_lightning.methods.prusc.supcon import cluster_supcon

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 2, (batch,), generator=g).to(device)
    clusters = torch.randint(0, 16, (batch,), generator=g).to(device)
    erm = make_model(backbone).to(device).train()
    erm_opt = torch.optim.AdamW(erm.parameters(), lr=1e-3, weight_decay=1e-4)
    pruned = make_model(backbone).to(device).train()
    masks = attach_masks(pruned)
    for param in pruned.parameters():
        param.requires_grad_(False)
    for mask in masks.values():
        mask.set_mode("learn")
    logits = [m.logits for m in masks.values()]
    mask_opt = torch.optim.Adam(logits, lr=0.05)

    def erm_step() -> None:
        loss = F.cross_entropy(erm(x), y)
        erm_opt.zero_grad(set_to_none=True)
        loss.backward()
        erm_opt.step()

    def mask_step() -> None:
        features = pruned.features(x)
        sparsity = torch.stack([torch.sigmoid(p).sum() for p in logits]).sum()
        loss = (
            F.cross_entropy(pruned.head(features), y)
            + 1e-4 * sparsity
            + cluster_supcon(features, y, clusters)
        )
        mask_opt.zero_grad(set_to_none=True)
        loss.backward()
        mask_opt.step()

    def timed(step) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(3):  # warm-up
        erm_step(), mask_step()
    erm_s, mask_s = [], []
    for _ in range(steps):
        erm_s.append(timed(erm_step))
        mask_s.append(timed(mask_step))
    n_weights = sum(p.numel() for p in logits)
    return {
        "benchmark": "PruSC mask-learning step vs ERM step, same batch (alternating, medians)",
        "backbone": backbone, "batch": batch, "image_size": size, "device": device, "masked_weights": n_weights,
        "erm_step_s": statistics.median(erm_s), "mask_step_s": statistics.median(mask_s),
        "ratio": statistics.median(mask_s) / statistics.median(erm_s), "target": "<= 1.5",
        "runs_erm_s": erm_s, "runs_mask_s": mask_s,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--n", type=int, default=1280, help="training samples per ERM epoch (erm)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--only",
        default="erm,dfr,baselines,sscore,score,prusc,lrp,lrp_efficientnet,attnlrp",
        help="comma-separated benchmarks to run",
    )
    parser.add_argument("--vit", default="vit_tiny_patch16_224", help="backbone of the attnlrp benchmark")
    parser.add_argument("--lrp-size", type=int, default=224, help="image side for the lrp benchmark")
    parser.add_argument("--sscore-neurons", type=int, default=None, help="captum loop over this many neurons")
    parser.add_argument(
        "--large-batch", type=int, default=None,
        help="also time the PruSC step and LRP at 224 px with this batch (e.g. 128, a realistic GPU batch)",
    )  # fmt: skip
    args = parser.parse_args()
    args.only = set(args.only.split(","))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    OUT.mkdir(exist_ok=True)
    if "dfr" in args.only:
        result = bench_dfr(args.backbone, device, args.repeats)
        (OUT / f"speed_dfr_{device}.json").write_text(json.dumps(result, indent=2))
        print(
            f"\nDFR refit ({result['n_refit']} x {result['features']} embeddings) vs ERM epoch ({result['n_train']} images)"
        )
        print(f"ERM epoch      {result['erm_epoch_s']:.2f} s")
        print(f"DFR refit      {result['refit_s']:.2f} s")
        print(
            f"ratio          {result['ratio']:.3f}  (target <= 0.10; {result['workers']} workers; one process "
            f"{result['sequential_ratio']:.3f})"
        )
        print(f"AFR refit      {result['afr_refit_s']:.2f} s, ratio {result['afr_ratio']:.3f}  (target <= 1)")
    if "baselines" in args.only:
        from speed_baselines import bench_baselines

        result = bench_baselines(args.backbone, device, args.repeats, args.n, args.image_size)
        (OUT / f"speed_baselines_{device}.json").write_text(json.dumps(result, indent=2))
        print(f"\nGroupDRO / JTT epoch vs ERM epoch ({args.backbone}, {args.n} images, {device})")
        print(f"GroupDRO       {result['groupdro_ratio']:.3f}  (target <= 1.05)")
        print(
            f"JTT            {result['jtt_ratio']:.3f}  (target <= 1.05); identification pass "
            f"{result['jtt_identify_ratio']:.2f} of an ERM epoch"
        )
    if "sscore" in args.only:
        result = bench_sscore(args.sscore_neurons)
        (OUT / "speed_sscore_cpu.json").write_text(json.dumps(result, indent=2))
        print(
            f"\ns-score, {result['neurons']} neurons x {result['samples']} samples ({result['image_size']} px)"
        )
        print(f"one pass       {result['ours_s']:.2f} s")
        print(f"captum loop    {result['captum_s']:.2f} s")
        print(f"speed-up       {result['speedup']:.0f}x  (target >= 100), max |score difference| "
              f"{result['max_abs_score_difference']:.2e}")  # fmt: skip
    if "score" in args.only:
        result = bench_score(args.backbone, device, args.repeats, args.n, args.image_size)
        (OUT / f"speed_score_{device}.json").write_text(json.dumps(result, indent=2))
        print(f"\nSCORE ({args.backbone}, {device})")
        print(f"regularized epoch / ERM epoch   {result['step_ratio']:.3f}  (target <= 1.10)")
        print(f"mining {result['mining_s']:.1f} s / ERM epoch {result['erm_epoch_full_train_s']:.1f} s = "
              f"{result['mining_ratio']:.2f}  (target <= 1)")  # fmt: skip
    if "prusc" in args.only:  # small images: the weights dominate (worst case); 224 px: the usual case
        results = [
            bench_prusc(args.backbone, device, 10 * args.repeats, args.image_size, batch=64),
            bench_prusc(args.backbone, device, 3 * args.repeats, 224, batch=16),
        ]
        if args.large_batch:
            results.append(bench_prusc(args.backbone, device, 3 * args.repeats, 224, batch=args.large_batch))
        (OUT / f"speed_prusc_{device}.json").write_text(json.dumps(results, indent=2))
        for result in results:
            print(f"\nPruSC mask step vs ERM step ({args.backbone}, batch {result['batch']} at "
                  f"{result['image_size']} px, {device})")  # fmt: skip
            print(f"ERM step       {result['erm_step_s'] * 1000:.1f} ms")
            print(f"mask step      {result['mask_step_s'] * 1000:.1f} ms")
            print(f"ratio          {result['ratio']:.3f}  (target <= 1.5)")
    lrp_runs = [(args.backbone, args.lrp_size, 32)] if "lrp" in args.only else []
    if "lrp_efficientnet" in args.only and ("efficientnet_lite0", 128, 32) not in lrp_runs:
        lrp_runs.append(("efficientnet_lite0", 128, 32))
    if args.large_batch:
        lrp_runs += [(b, 224, args.large_batch) for b in (args.backbone, "efficientnet_lite0") if lrp_runs]
    for backbone, size, batch in lrp_runs:
        result = bench_lrp(backbone, size, args.repeats, device=device, batch=batch)
        tag = ("" if backbone == "resnet18" else f"_{backbone}") + (
            "" if batch == 32 else f"_b{batch}_{size}px"
        )
        (OUT / f"speed_lrp{tag}_{device}.json").write_text(json.dumps(result, indent=2))
        print(f"\nLRP vs forward ({backbone}, batch {batch} at {size} px, {device})")
        print(f"forward        {result['forward_img_per_s']:.1f} img/s")
        print(f"LRP            {result['lrp_img_per_s']:.1f} img/s")
        print(f"ratio          {result['ratio']:.3f}  (target >= 0.3)")
    if "attnlrp" in args.only:
        result = bench_lrp(args.vit, args.lrp_size, args.repeats, goal=">= 0.25", device=device)
        (OUT / f"speed_attnlrp_{device}.json").write_text(json.dumps(result, indent=2))
        print(f"\nAttnLRP vs forward ({args.vit}, batch 32 at {args.lrp_size} px)")
        print(f"forward        {result['forward_img_per_s']:.1f} img/s")
        print(f"AttnLRP        {result['lrp_img_per_s']:.1f} img/s")
        print(f"ratio          {result['ratio']:.3f}  (target >= 0.25)")
    if "erm" not in args.only:
        return
    dm = make_data(args.n, args.image_size)
    plain_epoch(dm, args.backbone, device)  # warm-up
    plain, light, checked = [], [], []
    for _ in range(args.repeats):
        plain.append(plain_epoch(dm, args.backbone, device)[0])
        light.append(lightning_epoch(dm, args.backbone, device))
        checked.append(lightning_epoch(dm, args.backbone, device, (FiniteLoss(),)))
    result = {
        "benchmark": "ERM epoch, Lightning stack vs plain PyTorch loop",
        "backbone": args.backbone, "n": args.n, "image_size": args.image_size, "device": device,
        "plain_s": min(plain), "lightning_s": min(light), "ratio": min(light) / min(plain), "target": "<= 1.05",
        "ratio_of_medians": statistics.median(light) / statistics.median(plain),
        "runs_plain_s": plain, "runs_lightning_s": light,
        "finite_loss_s": min(checked), "finite_loss_ratio": min(checked) / min(light), "runs_finite_loss_s": checked,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "lightning": L.__version__,
    }  # fmt: skip
    (OUT / f"speed_erm_{device}.json").write_text(json.dumps(result, indent=2))
    print(f"\nERM epoch ({args.backbone}, {args.n} images at {args.image_size}px, {device})")
    print(f"plain loop     {result['plain_s']:.2f} s")
    print(f"Lightning      {result['lightning_s']:.2f} s")
    print(
        f"ratio          {result['ratio']:.3f}  (fastest runs; target <= 1.05), medians {result['ratio_of_medians']:.3f}"
    )
    print(
        f"FiniteLoss     {result['finite_loss_ratio']:.3f} of the Lightning epoch (its per-step check of the loss)"
    )


if __name__ == "__main__":
    main()
