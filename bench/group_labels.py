"""How much group information each row of the tables uses beyond class labels (DPE's README column), to train,
refit or select: the suite's and the photo benchmark's rows."""

from __future__ import annotations

GROUP_INFO = {
    "ERM": "none",
    "DFR": "val groups",
    "DFR (scikit-learn reference)": "val groups",
    "PruSC": "none",
    "PruSC (mask epochs only)": "none",
    "PruSC + fine-tuning": "none",
    "SCORE (auto)": "none",
    "SCORE (oracle)": "train spurious masks",
    "SCORE (contribution)": "none",
    "SCORE (masked logit)": "none",
    "SCORE (oracle, contribution)": "train spurious masks",
    "control: SCORE on random neurons": "none",
    "control: SCORE on random neurons (activation)": "none",
    "control: SCORE at strength 0": "none",
    "s-score pruning": "train spurious masks",
    "AFR": "none",
    "JTT": "none",
    "GroupDRO": "train groups",
    "control: ERM continued": "none",
    "control: BatchNorm re-estimated": "none",
    "control: fine-tuning on the same clusters": "none",
    "control: retrain on val": "none",
}
