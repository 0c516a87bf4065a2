"""Stages as Lightning callbacks: each attaches to ``ShortcutClassifier`` or to a module of yours."""

from shortcut_lightning.callbacks.group_metrics import GroupMetrics

__all__ = ["GroupMetrics"]
