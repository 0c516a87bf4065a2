"""Explanations: LRP relevance (zennit; AttnLRP for ViTs), Grad-CAM maps, per-token and per-head views."""

from shortcut_lightning.xai.attention import ViTCanonizer
from shortcut_lightning.xai.canonizers import ResidualBlockCanonizer, canonizers_for, residual_blocks
from shortcut_lightning.xai.gradcam import NeuronMaps, neuron_gradcam, score_maps, spurious_scores
from shortcut_lightning.xai.lrp import COMPOSITES, LRPResult, make_composite, relevance
from shortcut_lightning.xai.token_views import attention_maps, token_relevance

__all__ = [
    "COMPOSITES",
    "LRPResult",
    "NeuronMaps",
    "ResidualBlockCanonizer",
    "ViTCanonizer",
    "attention_maps",
    "canonizers_for",
    "make_composite",
    "neuron_gradcam",
    "relevance",
    "residual_blocks",
    "score_maps",
    "spurious_scores",
    "token_relevance",
]
