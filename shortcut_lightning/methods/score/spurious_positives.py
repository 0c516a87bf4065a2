"""The steps of SCORE's mining ("Shortcut Mitigation via Spurious-Positive Samples") as small functions on
tensors: masks, selection, neuron scores.

:class:`~shortcut_lightning.callbacks.SpuriousPositiveMining` runs them on a model; they are kept apart
so each is tested on its own and reusable in a notebook.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from shortcut_lightning.errors import ShortcutError


def relevance_mask(relevance: Tensor, top_q: float, dilation: int = 0) -> Tensor:
    """Binary mask [N,1,H,W] of the pixels holding the top ``top_q`` share of positive relevance.

    ``relevance`` is the input relevance [N,C,H,W] (summed over channels here). A pixel is kept when its
    relevance is positive and among the ``ceil(top_q * H * W)`` largest of its image; ``dilation``
    grows the mask by that many pixels (a max-pool), so a thin outline covers the object it outlines.
    """
    if not 0 < top_q <= 1:
        raise ShortcutError(f"top_q must be in (0, 1], got {top_q}")
    pixels = relevance.sum(1, keepdim=True)
    flat = pixels.flatten(1)
    k = max(1, round(top_q * flat.shape[1]))
    kth = flat.topk(k, dim=1).values[:, -1:]
    mask = ((flat >= kth) & (flat > 0)).view_as(pixels)
    if dilation > 0:
        mask = F.max_pool2d(mask.float(), 2 * dilation + 1, stride=1, padding=dilation) > 0
    return mask


def mask_images(images: Tensor, masks: Tensor, fill: float = 0.0) -> Tensor:
    """Keep the masked pixels, set the rest to ``fill`` (0 is the dataset mean after normalisation)."""
    return images * masks + fill * (~masks)


def neuron_scores(activations: Tensor, relevance: Tensor) -> Tensor:
    """SCORE's neuron score: mean over samples of pooled activation times relu(relevance), [n, C] -> [C]."""
    return (activations * relevance.clamp(min=0)).mean(0)


def select_neurons(
    scores: Tensor, k: int | None = 10, z: float | None = None, share: float | None = None
) -> Tensor:
    """The ``k`` highest-scoring neurons; or (``z`` given) those scoring above mean + z * std; or (``share``
    given) the highest-scoring ``ceil(share * C)`` of the layer's ``C`` channels."""
    if z is not None:
        chosen = (scores > scores.mean() + z * scores.std()).nonzero().flatten()
        return chosen[scores[chosen].argsort(descending=True)]
    if share is not None:
        k = max(1, math.ceil(share * len(scores)))
    if k is None or k < 1:
        raise ShortcutError(f"num_neurons must be >= 1 (or give z_score), got {k}")
    if k > len(scores):
        raise ShortcutError(
            f"num_neurons={k} but the layer has only {len(scores)} channels; lower num_neurons"
        )
    return scores.topk(k).indices


def mask_overlap(masks: Tensor, spurious: Tensor) -> Tensor:
    """Overlap coefficient of each relevance mask [N,1,H,W] with the ground-truth spurious region [N,1,H,W].

    ``|M & S| / min(|M|, |S|)`` (0 if either is empty): 1 when the mask lies inside the region or covers
    all of it. A plain share of the mask would cap a 20% mask on a patch of 6% of the image at 0.3.
    """
    inside = (masks & spurious).flatten(1).sum(1).float()
    smaller = torch.minimum(masks.flatten(1).sum(1), spurious.flatten(1).sum(1))
    return inside / smaller.clamp(min=1).float()


def confuser_similarity(embeddings: Tensor, confusers: Tensor) -> Tensor:
    """Cosine similarity of each masked-region embedding to the mean of the confusers' (the auto rule)."""
    prototype = F.normalize(confusers, dim=1).mean(0, keepdim=True)
    return F.cosine_similarity(embeddings, prototype, dim=1)
