"""GroupDRO: online group weights over the per-sample losses (group labels on train)."""

from shortcut_lightning.methods.groupdro.group_dro import GroupDRO

__all__ = ["GroupDRO"]
