"""The neuron spurious score (s-score): Grad-CAM overlap with spurious-region masks, and s-score pruning."""

from shortcut_lightning.methods.sscore.spurious_score import SpuriousScore

__all__ = ["SpuriousScore"]
