"""``TokenViews``: a ViT's attention per layer and head, and its LRP relevance per patch, in TensorBoard."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from shortcut_lightning.data.base import require_group_datamodule
from shortcut_lightning.data.transforms import denormalize
from shortcut_lightning.errors import ShortcutError
from shortcut_lightning.probing.activations import require_token_layout
from shortcut_lightning.probing.model_parts import evaluating, first_transformer_block
from shortcut_lightning.reporting.figures import new_figure
from shortcut_lightning.xai.lrp import relevance
from shortcut_lightning.xai.token_views import attention_maps


class TokenViews(Callback):
    """For a ViT, attention of one query patch per layer and head, plus LRP per patch token.

    Fig. 9 of "An XAI-based Analysis of Shortcut Learning in Neural Networks" (Le et al.) shows these views.

    After every ``every_n_epochs``-th validation (and once on ``validate``/``test``), on rank 0, for one
    fixed sample of each group of ``split`` (up to ``num_samples``): a grid of attention maps (rows:
    blocks, columns: heads) of the token ``query`` (``"cls"`` or ``[row, col]`` of a patch), and the
    AttnLRP relevance of the sample's label on the pixels and per patch token at ``block`` (default:
    the first block; at the last block of a class-token ViT all relevance sits on the class token).
    Logged as TensorBoard figures ``tokens/<group>`` and written to ``<log_dir>/token_views/``.

    Example::

        trainer = L.Trainer(max_epochs=2, callbacks=[TokenViews(query=[3, 4])])
        model = ShortcutClassifier("vit_tiny_patch16_224", backbone_kwargs={"img_size": 32, "patch_size": 4})
        trainer.fit(model, datamodule=SyntheticShortcuts())

    Args:
        split: the split the samples come from.
        num_samples: samples shown (one per group first).
        query: ``"cls"`` or ``[row, col]`` of the query patch.
        block: dotted name of the block whose token relevance is drawn; default the first ViT block.
        composite: LRP composite.
        every_n_epochs: draw after every n-th validation epoch.
    """

    def __init__(
        self,
        split: str = "val",
        num_samples: int = 4,
        query: str | Sequence[int] = "cls",
        block: str | None = None,
        composite: str = "epsilon_plus_flat",
        every_n_epochs: int = 1,
    ) -> None:
        if num_samples < 1 or every_n_epochs < 1:
            raise ShortcutError("TokenViews: num_samples and every_n_epochs must be >= 1")
        if query != "cls" and (isinstance(query, str) or len(query) != 2):
            raise ShortcutError(f"TokenViews: query must be 'cls' or [row, col] of a patch, got {query!r}")
        self.split, self.num_samples, self.query = split, num_samples, query
        self.block, self.composite, self.every_n_epochs = block, composite, every_n_epochs
        self.written: list[str] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit" and (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self.draw(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.draw(trainer, pl_module)

    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Draws and logs the views of the current model (rank 0 only; no collective calls)."""
        if not trainer.is_global_zero:
            return
        layout = require_token_layout(pl_module, "TokenViews")
        block = self.block or first_transformer_block(pl_module)
        query = 0 if self.query == "cls" else layout.position(*self.query)
        dm = require_group_datamodule(getattr(trainer, "datamodule", None), "TokenViews")
        dataset = dm.dataset(self.split)
        picks = _one_per_group(dataset.groups, self.num_samples)
        samples = [dataset[i] for i in picks]
        images = torch.stack([s["image"] for s in samples]).to(pl_module.device)
        targets = torch.tensor([int(s["target"]) for s in samples], device=pl_module.device)
        with evaluating(pl_module):
            attention = attention_maps(pl_module, images, query).cpu()  # [L, N, heads, rows, cols]
            lrp = relevance(pl_module, images, targets, self.composite, [block], per="position")
        tokens = layout.to_grid(lrp.layers[block]).cpu()
        log_dir = Path(trainer.log_dir or trainer.default_root_dir) / "token_views"
        log_dir.mkdir(parents=True, exist_ok=True)
        for k, index in enumerate(picks):
            group = dm.group_names[int(dataset.groups[index])]
            maps = {"LRP pixels": lrp.input[k].sum(0).cpu(), f"LRP {block.split('.', 1)[-1]}": tokens[k]}
            figure = _figure(images[k].cpu(), attention[:, k], maps, f"{group} #{index}")
            path = log_dir / f"{trainer.state.fn.value}_epoch{trainer.current_epoch:03d}_{group}.png"
            figure.savefig(path, dpi=80)
            self.written.append(str(path))
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_figure(f"tokens/{group}", figure, global_step=trainer.global_step)


def _one_per_group(groups: Tensor, n: int) -> list[int]:
    """Dataset positions: the first sample of each group, then the next ones, ``n`` in all."""
    order: list[int] = []
    by_group = [(groups == g).nonzero().flatten().tolist() for g in sorted(set(groups.tolist()))]
    rank = 0
    while len(order) < min(n, len(groups)):
        for members in by_group:
            if rank < len(members) and len(order) < n:
                order.append(members[rank])
        rank += 1
    return order


def _figure(image: Tensor, attention: Tensor, relevance: dict[str, Tensor], title: str) -> Any:
    """The image and its relevance maps down the first two columns, one attention map per (block, head)."""
    layers, heads = attention.shape[:2]
    rows = max(layers, (len(relevance) + 2) // 2)
    figure = new_figure(1.3 * (heads + 2), 1.3 * rows + 0.4)
    figure.suptitle(title, fontsize=9)
    grid = figure.add_gridspec(rows, heads + 2)
    ax = figure.add_subplot(grid[0, 0])
    ax.imshow(denormalize(image[None])[0].permute(1, 2, 0).numpy())
    ax.set_title("image", fontsize=7)
    for k, (name, values) in enumerate(relevance.items(), start=1):
        ax = figure.add_subplot(grid[k // 2, k % 2])
        bound = float(values.abs().max().clamp_min(1e-12))
        ax.imshow(values.numpy(), cmap="bwr", vmin=-bound, vmax=bound)
        ax.set_title(name, fontsize=7)
    for b in range(layers):
        for h in range(heads):
            ax = figure.add_subplot(grid[b, h + 2])
            ax.imshow(attention[b, h].numpy(), cmap="viridis")
            ax.set_title(f"block {b} head {h}", fontsize=6)
    for ax in figure.axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return figure
