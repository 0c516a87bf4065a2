"""Deep Feature Reweighting: refit the last layer on group-balanced held-out embeddings."""

from shortcut_lightning.methods.dfr.deep_feature_reweighting import DeepFeatureReweighting

__all__ = ["DeepFeatureReweighting"]
