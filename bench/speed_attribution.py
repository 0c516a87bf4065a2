"""Attribution's speed: the s-score's one-pass Grad-CAM against captum's loop over neurons
(``python -m bench speed --only sscore``), and LRP's throughput against a forward pass (``--only lrp``,
``lrp_efficientnet``, ``attnlrp``)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from bench.speed_epochs import make_model
from shortcut_lightning import SyntheticShortcuts


def bench_sscore(n_neurons: int | None) -> dict[str, Any]:
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

    def one_neuron(i: int) -> torch.Tensor:
        attribution = captum.attribute(x, target=int(i), relu_attributions=True).detach()
        return spurious_scores(attribution, masks, alpha=0.5)[0]

    start = time.perf_counter()
    theirs = torch.stack([one_neuron(int(i)) for i in neurons])
    captum_s = time.perf_counter() - start
    return {
        "benchmark": "s-score of penultimate neurons: one-pass Grad-CAM vs captum LayerGradCam per neuron",
        "backbone": "resnet18",
        "samples": len(x),
        "image_size": x.shape[-1],
        "neurons": len(neurons),
        "ours_s": ours_s,
        "captum_s": captum_s,
        "speedup": captum_s / ours_s,
        "target": ">= 100",
        "max_abs_score_difference": float((ours - theirs).abs().max()),
    }


def bench_lrp(
    backbone: str, image_size: int, repeats: int, goal: str = ">= 0.3", device: str = "cpu", batch: int = 32
) -> dict[str, Any]:
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
        "backbone": backbone,
        "image_size": image_size,
        "batch": batch,
        "device": device,
        "forward_img_per_s": batch / timings["forward"],
        "lrp_img_per_s": batch / timings["lrp"],
        "ratio": timings["forward"] / timings["lrp"],
        "target": goal,
    }
