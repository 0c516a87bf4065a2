"""shortcut_lightning: find and remove shortcut learning in image classifiers with PyTorch Lightning.

Every module logs through ``logging.getLogger(__name__)``, so its lines sit under the ``shortcut_lightning``
logger: ``logging.getLogger("shortcut_lightning").setLevel(logging.WARNING)`` silences the library's info lines.
"""

import logging

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

# As Lightning does for its own logger at import: INFO, and a handler of our own (stderr) unless the root logger
# has one, whose handlers then show the lines (no line twice: ours does not propagate beside its own handler).
_logger = logging.getLogger(__name__)
_logger.setLevel(logging.INFO)
if not _logger.handlers and not logging.getLogger().hasHandlers():
    _logger.addHandler(logging.StreamHandler())
    _logger.propagate = False

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
