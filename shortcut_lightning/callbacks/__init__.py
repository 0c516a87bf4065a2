"""Stages as Lightning callbacks: each attaches to ``ShortcutClassifier`` or to a module of yours."""

from shortcut_lightning.callbacks.checkpoint import BestAndLastCheckpoint
from shortcut_lightning.callbacks.dfr import DeepFeatureReweighting
from shortcut_lightning.callbacks.embedding_projector import EmbeddingProjector
from shortcut_lightning.callbacks.group_metrics import GroupMetrics
from shortcut_lightning.callbacks.mask_pruning import MaskPruning
from shortcut_lightning.callbacks.neuron_regularization import NeuronRegularization
from shortcut_lightning.callbacks.partial_finetuning import PartialFinetuning
from shortcut_lightning.callbacks.spurious_positive_mining import SpuriousPositiveMining
from shortcut_lightning.callbacks.spurious_score import SpuriousScore
from shortcut_lightning.callbacks.token_views import TokenViews

__all__ = [
    "BestAndLastCheckpoint",
    "DeepFeatureReweighting",
    "EmbeddingProjector",
    "GroupMetrics",
    "MaskPruning",
    "NeuronRegularization",
    "PartialFinetuning",
    "SpuriousPositiveMining",
    "SpuriousScore",
    "TokenViews",
]
