"""The one figure helper: a matplotlib Figure on the Agg canvas (no pyplot, no global state)."""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(ncols: int = 1, width: float = 4.0, height: float = 3.0) -> Figure:
    """A ``width * ncols`` by ``height`` inch figure, ready for ``add_subplot`` and ``savefig``."""
    fig = Figure(figsize=(width * ncols, height))
    FigureCanvasAgg(fig)
    return fig
