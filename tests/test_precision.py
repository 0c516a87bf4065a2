"""Mixed precision: attribution stays float32 inside autocast, and every stage trains under bf16-mixed."""

from __future__ import annotations

import json

import lightning as L
import pytest
import timm
import torch

from shortcut_lightning import ShortcutClassifier
from shortcut_lightning.callbacks import MaskPruning, NeuronRegularization, SpuriousPositiveMining
from shortcut_lightning.errors import ModelError
from shortcut_lightning.xai import relevance
from shortcut_lightning.xai.gradcam import neuron_gradcam

from helpers import make_trainer


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=3).eval()


def test_lrp_inside_a_bf16_autocast_step_is_the_float32_relevance():
    model, x = _model(), torch.randn(2, 3, 32, 32)
    want = relevance(model, x, 1, layers=["layer3"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16  # the context does cast an ordinary forward
        got = relevance(model, x, 1, layers=["layer3"])
    assert got.input.dtype == torch.float32 and got.layers["layer3"].dtype == torch.float32
    torch.testing.assert_close(got.input, want.input, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.layers["layer3"], want.layers["layer3"], rtol=1e-5, atol=1e-7)


def test_gradcam_inside_a_bf16_autocast_step_is_the_float32_map():
    model, x = _model(), torch.randn(2, 3, 64, 64)
    neurons = torch.tensor([0, 7, 300])
    want = neuron_gradcam(model, x, model.layer3, model.get_classifier(), neurons)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = neuron_gradcam(model, x, model.layer3, model.get_classifier(), neurons)
    assert got.maps.dtype == torch.float32
    torch.testing.assert_close(got.maps, want.maps, rtol=1e-5, atol=1e-7)


def test_attribution_turns_tf32_off_and_always_restores_it():
    """CUDA's default TF32 convolutions moved LRP's canonized logits by 12% (H200); the flags are global."""
    from shortcut_lightning.xai.precision import float32_attribution

    model = _model()
    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # noqa: E731
    before = flags()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with pytest.raises(RuntimeError, match="inside"), float32_attribution(model, "cpu", "LRP"):
            assert flags() == (False, False)
            raise RuntimeError("inside")
        assert flags() == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_half_weights_are_refused_with_the_fix():
    model = _model().to(torch.bfloat16)
    with pytest.raises(ModelError, match="bf16-mixed"):
        relevance(model, torch.randn(1, 3, 32, 32), 0)
    with pytest.raises(ModelError, match="Grad-CAM"):
        neuron_gradcam(model, torch.randn(1, 3, 32, 32), model.layer3, model.get_classifier())


def _bf16_trainer(tmp_path, callbacks, max_epochs: int) -> L.Trainer:
    return make_trainer(tmp_path, callbacks, max_epochs, precision="bf16-mixed")


def test_score_mines_and_regularizes_under_bf16_mixed(tmp_path, tiny_synthetic):
    torch.manual_seed(0)
    mining = SpuriousPositiveMining(
        selection="oracle",
        oracle_min_overlap=0.0,
        require_masked_prediction=False,
        top_m=8,
        num_selected=3,
        n_confusers=4,
        num_neurons=4,
    )
    trainer = _bf16_trainer(tmp_path, [mining, NeuronRegularization(strength=0.5)], 2)
    trainer.fit(ShortcutClassifier("test_resnet"), datamodule=tiny_synthetic(spurious="patch"))
    result = json.loads((tmp_path / "mining.json").read_text())
    assert all(len(entry["neurons"]) == 4 for entry in result["classes"].values())
    assert torch.isfinite(trainer.callback_metrics["train/penalty/neuron_regularization_epoch"])


def test_prusc_learns_masks_under_bf16_mixed(tmp_path, tiny_synthetic):
    torch.manual_seed(0)
    pruning = MaskPruning(
        prune_epochs=2, num_clusters=4, mask_lr=0.5, init_logit=0.5, report_splits=(), export=False
    )
    model = ShortcutClassifier("test_resnet")
    _bf16_trainer(tmp_path, [pruning], 2).fit(model, datamodule=tiny_synthetic())
    logits = [p for n, p in model.named_parameters() if n.endswith("logits")]
    assert logits and all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in logits)
    assert any((p != 0.5).any() for p in logits)  # the masks did learn
