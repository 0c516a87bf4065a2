"""SCORE's look at a sample: its LRP mask, the masked image, and what the model does with each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import lightning as L
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from shortcut_lightning.methods.score.spurious_positives import mask_images, mask_overlap, relevance_mask
from shortcut_lightning.probing.activations import reduce_channels
from shortcut_lightning.probing.embedding_pass import Embeddings
from shortcut_lightning.probing.hooks import layer_and_embedding
from shortcut_lightning.probing.model_parts import evaluating
from shortcut_lightning.xai import relevance


class LRPMasking(NamedTuple):
    """How a relevance mask is made and applied (``SpuriousPositiveMining``'s arguments of the same names)."""

    composite: str
    top_q: float
    dilation: int
    fill: float
    batch_size: int


@dataclass
class SampleAnalysis:
    """What the LRP look at ``n`` samples for one class found, one row per sample (all on the CPU).

    ``images`` [n,3,H,W] and their relevance ``masks`` [n,1,H,W] (bool); ``activation`` [n,C] the pooled
    channels of the scored layer on the image; ``relevance`` [n,C] the relevance at that layer and
    ``embedding`` [n,d] the head's input, both of the masked image; ``kept`` whether the masked image is
    still predicted the class; ``overlap`` (only where the data has spurious masks) of each relevance mask
    with the true spurious region.
    """

    images: Tensor
    masks: Tensor
    activation: Tensor
    relevance: Tensor
    embedding: Tensor
    kept: Tensor
    overlap: Tensor | None = None

    def __len__(self) -> int:
        return len(self.kept)


@dataclass
class LRPProbe:
    """One mining round's view of the model: the scored ``layer`` (named ``layer_name``), the ``head``, the
    training split and how relevance masks are made. :meth:`analyse` is what the mining and its selection
    rules call; the model is the one of this round."""

    model: L.LightningModule
    dataset: Any
    layer: nn.Module
    layer_name: str
    head: nn.Module
    settings: LRPMasking

    def analyse(self, indices: list[int], c: int, desc: str) -> SampleAnalysis:
        """:func:`analyse_samples` of the dataset's samples ``indices`` for class ``c``."""
        return analyse_samples(
            self.model, self.dataset, indices, c, self.layer, self.layer_name, self.head, desc, self.settings
        )


def top_by_logit(train: Embeddings, c: int, own: bool, n: int) -> list[int]:
    """Indices of the ``n`` samples of class ``c`` (``own``; else of the other classes) with the highest logit ``c``."""
    rows = ((train.target == c) if own else (train.target != c)).nonzero().flatten()
    order = train.logits[rows, c].argsort(descending=True, stable=True)
    return train.index[rows[order[:n]]].tolist()


def _forward(
    model: L.LightningModule, images: Tensor, layer: nn.Module, head: nn.Module
) -> tuple[Tensor, Tensor]:
    """``layer``'s output and the embedding of ``images``, in eval mode without gradients."""
    with torch.no_grad(), evaluating(model):
        return layer_and_embedding(model, layer, head, images)


def analyse_samples(
    model: L.LightningModule,
    dataset: Any,
    indices: list[int],
    c: int,
    layer: nn.Module,
    layer_name: str,
    head: nn.Module,
    desc: str,
    settings: LRPMasking,
) -> SampleAnalysis:
    """LRP masks, masked images and what the model does with them, for the samples ``indices`` and class ``c``.

    Per sample: the image, its mask (top ``top_q`` of the input relevance), the channel activation at
    ``layer`` of the image, the relevance at ``layer`` and the embedding of the masked image, whether the
    masked image keeps class ``c``, and with spurious masks their overlap with the LRP mask.
    """
    parts: dict[str, list[Tensor]] = {}
    size = settings.batch_size
    chunks = [indices[i : i + size] for i in range(0, len(indices), size)]
    show = getattr(getattr(model, "_trainer", None), "is_global_zero", True)
    for chunk in tqdm(chunks, desc=f"SCORE: LRP on class {desc}", leave=False, disable=not show):
        samples = [dataset[i] for i in chunk]
        x = torch.stack([s["image"] for s in samples]).to(model.device)
        masks = relevance_mask(
            relevance(model, x, c, settings.composite).input, settings.top_q, settings.dilation
        )
        masked = mask_images(x, masks, settings.fill)
        activation, _ = _forward(model, x, layer, head)
        lrp = relevance(model, masked, c, settings.composite, [layer_name])
        _, embedding = _forward(model, masked, layer, head)
        got = {
            "images": x.cpu(),
            "masks": masks.cpu(),
            "activation": reduce_channels(activation).cpu(),
            "relevance": lrp.layers[layer_name].cpu(),
            "embedding": embedding.flatten(1).cpu(),
            "kept": (lrp.logits.argmax(1) == c).cpu(),
        }
        if getattr(dataset, "has_masks", False):
            spurious = torch.stack([s["mask"] for s in samples]).cpu()
            got["overlap"] = mask_overlap(masks.cpu(), spurious)
        for key, value in got.items():
            parts.setdefault(key, []).append(value)
    return SampleAnalysis(**{k: torch.cat(v) for k, v in parts.items()})
