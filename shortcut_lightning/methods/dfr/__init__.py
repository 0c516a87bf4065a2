"""Last-layer refits on held-out embeddings: DFR (group-balanced) and AFR (weighted by the ERM model's errors)."""

from shortcut_lightning.methods.dfr.automatic_feature_reweighting import AutomaticFeatureReweighting
from shortcut_lightning.methods.dfr.deep_feature_reweighting import DeepFeatureReweighting

__all__ = ["AutomaticFeatureReweighting", "DeepFeatureReweighting"]
