"""``new_figure``: a matplotlib figure rendered with Agg, whatever pyplot's backend is (no display needed)."""

from __future__ import annotations

from typing import Any


def new_figure(width: float, height: float) -> Any:
    """A ``Figure`` of ``width`` x ``height`` inches with an Agg canvas, for ``savefig`` and TensorBoard."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure
