"""Stages as Lightning callbacks: each attaches to ``ShortcutClassifier`` or to a module of yours."""

from shortcut_lightning.callbacks.batchnorm_recalibration import BatchNormRecalibration
from shortcut_lightning.callbacks.checkpoint import BestAndLastCheckpoint
from shortcut_lightning.callbacks.embedding_projector import EmbeddingProjector
from shortcut_lightning.callbacks.finite_loss import FiniteLoss
from shortcut_lightning.callbacks.group_metrics import GroupMetrics
from shortcut_lightning.callbacks.partial_finetuning import PartialFinetuning
from shortcut_lightning.callbacks.prediction_writer import PredictionWriter
from shortcut_lightning.callbacks.token_views import TokenViews
from shortcut_lightning.methods.dfr.automatic_feature_reweighting import AutomaticFeatureReweighting
from shortcut_lightning.methods.dfr.deep_feature_reweighting import DeepFeatureReweighting
from shortcut_lightning.methods.groupdro.group_dro import GroupDRO
from shortcut_lightning.methods.jtt.just_train_twice import JustTrainTwice
from shortcut_lightning.methods.prusc.mask_pruning import MaskPruning
from shortcut_lightning.methods.score.neuron_regularization import NeuronRegularization
from shortcut_lightning.methods.score.spurious_positive_mining import SpuriousPositiveMining
from shortcut_lightning.methods.sscore.spurious_score import SpuriousScore

__all__ = [
    "AutomaticFeatureReweighting",
    "BatchNormRecalibration",
    "BestAndLastCheckpoint",
    "DeepFeatureReweighting",
    "EmbeddingProjector",
    "FiniteLoss",
    "GroupDRO",
    "GroupMetrics",
    "JustTrainTwice",
    "MaskPruning",
    "NeuronRegularization",
    "PartialFinetuning",
    "PredictionWriter",
    "SpuriousPositiveMining",
    "SpuriousScore",
    "TokenViews",
]
