"""Stages as Lightning callbacks: each attaches to ``ShortcutClassifier`` or to a module of yours."""

from shortcut_lightning.callbacks.dfr import DeepFeatureReweighting
from shortcut_lightning.callbacks.embedding_projector import EmbeddingProjector
from shortcut_lightning.callbacks.group_metrics import GroupMetrics
from shortcut_lightning.callbacks.spurious_score import SpuriousScore

__all__ = ["DeepFeatureReweighting", "EmbeddingProjector", "GroupMetrics", "SpuriousScore"]
