"""Explanations: LRP relevance (zennit) and Grad-CAM maps."""

from shortcut_lightning.xai.canonizers import ResidualBlockCanonizer, canonizers_for, residual_blocks
from shortcut_lightning.xai.gradcam import NeuronMaps, neuron_gradcam, spurious_scores
from shortcut_lightning.xai.lrp import COMPOSITES, LRPResult, make_composite, relevance

__all__ = [
    "COMPOSITES",
    "LRPResult",
    "NeuronMaps",
    "ResidualBlockCanonizer",
    "canonizers_for",
    "make_composite",
    "neuron_gradcam",
    "relevance",
    "residual_blocks",
    "spurious_scores",
]
