"""shortcut_lightning: find and remove shortcut learning in image classifiers with PyTorch Lightning."""

from shortcut_lightning.callbacks import (
    AutomaticFeatureReweighting,
    BatchNormRecalibration,
    DeepFeatureReweighting,
    EmbeddingProjector,
    FiniteLoss,
    GroupDRO,
    GroupMetrics,
    JustTrainTwice,
    MaskPruning,
    NeuronRegularization,
    PredictionWriter,
    SpuriousPositiveMining,
    SpuriousScore,
    TokenViews,
)
from shortcut_lightning.data import ISIC, CelebA, MetadataDataModule, SyntheticShortcuts, Waterbirds
from shortcut_lightning.errors import DataError, ModelError, ShortcutError
from shortcut_lightning.metrics import GroupAccuracy
from shortcut_lightning.module import ShortcutClassifier
from shortcut_lightning.penalties import LossWeighting, PenaltyProvider, total_penalty, weighted_loss

__version__ = "0.1.0"

__all__ = [
    "ISIC",
    "AutomaticFeatureReweighting",
    "BatchNormRecalibration",
    "CelebA",
    "DataError",
    "DeepFeatureReweighting",
    "EmbeddingProjector",
    "FiniteLoss",
    "GroupAccuracy",
    "GroupDRO",
    "GroupMetrics",
    "JustTrainTwice",
    "LossWeighting",
    "MaskPruning",
    "MetadataDataModule",
    "ModelError",
    "NeuronRegularization",
    "PenaltyProvider",
    "PredictionWriter",
    "ShortcutClassifier",
    "ShortcutError",
    "SpuriousPositiveMining",
    "SpuriousScore",
    "SyntheticShortcuts",
    "TokenViews",
    "Waterbirds",
    "total_penalty",
    "weighted_loss",
]
