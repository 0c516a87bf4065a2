"""SCORE: mine spurious positives with LRP, then regularize the neurons they light up."""

from shortcut_lightning.methods.score.neuron_regularization import NeuronRegularization
from shortcut_lightning.methods.score.spurious_positive_mining import SpuriousPositiveMining

__all__ = ["NeuronRegularization", "SpuriousPositiveMining"]
