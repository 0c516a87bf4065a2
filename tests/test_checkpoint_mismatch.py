"""A checkpoint of another backbone or class count, as model.weights or --ckpt_path: one line that names both."""

from __future__ import annotations

from pathlib import Path

import lightning
import pytest
import torch

from shortcut_lightning import ShortcutClassifier, SyntheticShortcuts
from shortcut_lightning.cli import main
from shortcut_lightning.errors import ModelError

from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
TINY_ARGS = [
    "--data.n_train",
    "16",
    "--data.n_val",
    "8",
    "--data.n_test",
    "8",
    "--data.batch_size",
    "8",
    "--model.backbone",
    "test_resnet",
    "--trainer.enable_progress_bar",
    "false",
]


def _checkpoint(
    path: Path, backbone: str, num_classes: int, hyper_parameters: bool = True, masked: bool = False
):
    """A ShortcutClassifier checkpoint as Lightning writes one (its state dict and hyper-parameters)."""
    model = ShortcutClassifier(backbone, num_classes=num_classes)
    if masked:  # a stage's masks: weights in torch's parametrize layout, which a plain model lacks
        from shortcut_lightning.methods.prusc.masks import attach_masks

        attach_masks(model)
    saved = {"state_dict": model.state_dict(), "pytorch-lightning_version": lightning.__version__}
    if hyper_parameters:
        saved["hyper_parameters"] = dict(model.hparams)
    torch.save(saved, path)
    return path


def _one_line(error: Exception) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize(("backbone", "num_classes"), [("test_efficientnet", 2), ("test_resnet", 3)])
def test_model_weights_ckpt_of_another_backbone_or_class_count_names_both(tmp_path, backbone, num_classes):
    path = _checkpoint(tmp_path / "other.ckpt", backbone, num_classes)
    with pytest.raises(ModelError) as error:
        ShortcutClassifier("test_resnet", num_classes=2, weights=str(path))
    text = _one_line(error.value)
    assert (
        f"holds a {backbone} with {num_classes} classes, but this model is a test_resnet with 2 classes"
        in text
    )
    assert str(path) in text


def test_model_weights_ckpt_without_hyper_parameters_names_what_its_state_dict_shows(tmp_path):
    path = _checkpoint(tmp_path / "bare.ckpt", "test_efficientnet", 3, hyper_parameters=False)
    with pytest.raises(ModelError) as error:
        ShortcutClassifier("test_resnet", num_classes=2, weights=str(path))
    text = _one_line(error.value)
    assert "does not fit backbone 'test_resnet' with 2 classes" in text
    assert (
        "tensors not saved (first conv1.0.weight)" in text
        and "does not have (first conv_stem.weight)" in text
    )
    assert "its classifier.weight has 3 outputs" in text


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_model_weights_state_dict_of_another_backbone_is_refused_not_half_loaded(tmp_path, suffix):
    """timm loads a file whose classifier it drops (another class count) without strict names: a file of another
    network whose names and shapes do not clash left the model at its random init, silently."""
    state = ShortcutClassifier("test_efficientnet", num_classes=10).net.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("bn1.")}  # the one name both networks have
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    with pytest.raises(ModelError) as error:
        ShortcutClassifier("test_resnet", num_classes=2, pretrained=True, weights=str(path))
    text = _one_line(error.value)
    assert (
        f"model.weights {path} is not a state dict of backbone 'test_resnet' (this model, 2 classes)" in text
    )
    assert "its classifier.weight has 10 outputs" in text and "not saved (first conv1.0.weight)" in text
    # a file of the same network with another head still loads, with a new head
    torch.save(ShortcutClassifier("test_resnet", num_classes=10).net.state_dict(), tmp_path / "same.pth")
    model = ShortcutClassifier(
        "test_resnet", num_classes=2, pretrained=True, weights=str(tmp_path / "same.pth")
    )
    assert model.head.out_features == 2 and not model.head.weight.any()


def test_trainer_ckpt_path_of_another_backbone_names_both(tmp_path):
    """``trainer.validate(model, ckpt_path=...)``: Lightning loads the checkpoint into the model as it is."""
    path = _checkpoint(tmp_path / "other.ckpt", "test_efficientnet", 2)
    trainer = lightning.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(ModelError) as error:
        trainer.validate(
            ShortcutClassifier("test_resnet"), datamodule=SyntheticShortcuts(**TINY), ckpt_path=path
        )
    text = _one_line(error.value)
    assert text.startswith(
        f"the checkpoint {path} holds a test_efficientnet with 2 classes, but this model is a"
    )
    assert "test_resnet with 2 classes: set model.backbone: test_efficientnet" in text


def test_cli_ckpt_path_of_another_backbone_than_the_config_names_both(tmp_path, capsys):
    """LightningCLI would rebuild the model as the checkpoint's backbone, silently replacing the config's."""
    path = _checkpoint(tmp_path / "other.ckpt", "test_efficientnet", 2)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "validate",
                "--config",
                str(ROOT / "configs" / "synthetic" / "erm.yaml"),
                *TINY_ARGS,
                "--trainer.logger.init_args.save_dir",
                str(tmp_path / "runs"),
                "--ckpt_path",
                str(path),
            ]
        )
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        f"shortcut: error: --ckpt_path {path} holds a test_efficientnet, but the config's model is a test_resnet: "
        "pass the config the checkpoint was trained with, or --model.backbone test_efficientnet"
    )


# Through the CLI a checkpoint's hyper-parameters fill in the config's model arguments (LightningCLI reads them
# for --ckpt_path; another backbone is refused above): what can still differ is a checkpoint without them, the
# class count (linked from the data) and weights that a callback added (masks)
@pytest.mark.parametrize(
    ("backbone", "num_classes", "kind", "message"),
    [
        ("test_efficientnet", 3, "bare", "does not fit this model (test_resnet, 2 classes): "),
        (
            "test_resnet",
            3,
            "",
            "holds a test_resnet with 3 classes, but this model is a test_resnet with 2 classes",
        ),
        ("test_resnet", 2, "masked", "does not fit this model (test_resnet, 2 classes): "),
    ],
)
def test_cli_ckpt_path_of_another_model_is_one_line_that_names_both(
    tmp_path, capsys, backbone, num_classes, kind, message
):
    bare, masked = kind == "bare", kind == "masked"
    path = _checkpoint(
        tmp_path / "other.ckpt", backbone, num_classes, hyper_parameters=not bare, masked=masked
    )
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "validate",
                "--config",
                str(ROOT / "configs" / "synthetic" / "erm.yaml"),
                *TINY_ARGS,
                "--trainer.logger.init_args.save_dir",
                str(tmp_path / "runs"),
                "--ckpt_path",
                str(path),
            ]
        )
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"shortcut: error: the checkpoint {path} "), last  # the whole message on this line
    assert message in last
    if bare:  # what its state dict shows
        assert (
            "not saved (first net.conv1.0.weight)" in last
            and "its net.classifier.weight has 3 outputs" in last
        )
    if masked:
        assert "16 of the model's 92 tensors not saved (first net.conv1.0.weight)" in last
        assert "does not have (first net.conv1.0.parametrizations.weight.original)" in last
