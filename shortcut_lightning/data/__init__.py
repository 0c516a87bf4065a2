"""Datamodules: metadata.csv folders, the real-data presets and the embedded synthetic benchmark."""

from shortcut_lightning.data.base import SPLITS, GroupDataModule
from shortcut_lightning.data.datasets import FileImageDataset, GroupDataset, TensorImageDataset
from shortcut_lightning.data.metadata import MetadataDataModule
from shortcut_lightning.data.presets import ISIC, CelebA, Waterbirds
from shortcut_lightning.data.samplers import SAMPLERS, BalancedSampler, EvalShardSampler
from shortcut_lightning.data.synthetic import SyntheticShortcuts

__all__ = [
    "ISIC",
    "SAMPLERS",
    "SPLITS",
    "BalancedSampler",
    "CelebA",
    "EvalShardSampler",
    "FileImageDataset",
    "GroupDataModule",
    "GroupDataset",
    "MetadataDataModule",
    "SyntheticShortcuts",
    "TensorImageDataset",
    "Waterbirds",
]
