"""shortcut_lightning: find and remove shortcut learning in image classifiers with PyTorch Lightning."""

from shortcut_lightning.callbacks import (
    DeepFeatureReweighting,
    EmbeddingProjector,
    GroupMetrics,
    MaskPruning,
    NeuronRegularization,
    SpuriousPositiveMining,
    SpuriousScore,
    TokenViews,
)
from shortcut_lightning.data import ISIC, CelebA, MetadataDataModule, SyntheticShortcuts, Waterbirds
from shortcut_lightning.errors import DataError, ModelError, ShortcutError
from shortcut_lightning.metrics import GroupAccuracy
from shortcut_lightning.module import ShortcutClassifier
from shortcut_lightning.penalties import PenaltyProvider, total_penalty

__version__ = "0.1.0"

__all__ = [
    "ISIC",
    "CelebA",
    "DataError",
    "DeepFeatureReweighting",
    "EmbeddingProjector",
    "GroupAccuracy",
    "GroupMetrics",
    "MaskPruning",
    "MetadataDataModule",
    "ModelError",
    "NeuronRegularization",
    "PenaltyProvider",
    "ShortcutClassifier",
    "ShortcutError",
    "SpuriousPositiveMining",
    "SpuriousScore",
    "SyntheticShortcuts",
    "TokenViews",
    "Waterbirds",
    "total_penalty",
]
