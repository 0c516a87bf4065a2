"""One package per method; none imports another. Each exports its Lightning callbacks.

- :mod:`~shortcut_lightning.methods.dfr`: Deep Feature Reweighting (last-layer refit on group-balanced data).
- :mod:`~shortcut_lightning.methods.prusc`: PruSC (mask-learning pruning with a supervised contrastive loss).
- :mod:`~shortcut_lightning.methods.score`: SCORE (LRP mining of spurious positives, neuron regularization).
- :mod:`~shortcut_lightning.methods.sscore`: the neuron spurious score (Grad-CAM overlap) and s-score pruning.
"""
