"""PruSC: learn pruning masks with a supervised contrastive loss over clusters of the embedding (no group labels)."""

from shortcut_lightning.methods.prusc.mask_pruning import MaskPruning

__all__ = ["MaskPruning"]
