"""JTT: up-weight the training samples an ERM model misclassifies (no group labels)."""

from shortcut_lightning.methods.jtt.just_train_twice import JustTrainTwice

__all__ = ["JustTrainTwice"]
