"""The figures, from the contribution table alone. Colour-blind-safe colours (Okabe-Ito).

:data:`PLOTS` maps each figure's name (its file ``plots/<name>.png``) to the function that draws
it; a new figure is one function registered there, written in the module of its concern:
:mod:`~headperturb.analysis.figures.contributions` (the heads one by one),
:mod:`~headperturb.analysis.figures.maps` (layers x heads, the prompt's segments) or
:mod:`~headperturb.analysis.figures.together` (heads removed together, self-repair), on the style
of :mod:`~headperturb.analysis.figures.common`. :func:`chosen` says which figures a run draws.
matplotlib and pandas are imported when a figure is drawn, so the workflow can list the figures
without them.
"""

from __future__ import annotations

import threading

from headperturb.analysis.figures.choice import chosen
from headperturb.analysis.figures.common import CATEGORY_COLOURS, DPI, STYLE
from headperturb.analysis.figures.contributions import (
    SHOWN,
    contribution_distributions,
    contribution_vs_scale,
    detail,
    detailed_head_analysis,
    metric_names,
)
from headperturb.analysis.figures.maps import (
    HEATMAP_METRICS,
    SEGMENT_ROWS,
    heatmap_panels,
    layer_head_heatmap,
    screen_map,
    segment_map,
)
from headperturb.analysis.figures.together import (
    CURVE_METRICS,
    ORDER_COLOURS,
    ablation_curves,
    direct_vs_total,
)
from headperturb.core import files

__all__ = [
    "PLOTS",
    "plot",
    "chosen",
    "detail",
    "metric_names",
    "heatmap_panels",
    "CATEGORY_COLOURS",
    "DPI",
    "STYLE",
    "SHOWN",
    "HEATMAP_METRICS",
    "SEGMENT_ROWS",
    "CURVE_METRICS",
    "ORDER_COLOURS",
    "contribution_distributions",
    "detailed_head_analysis",
    "layer_head_heatmap",
    "contribution_vs_scale",
    "screen_map",
    "segment_map",
    "ablation_curves",
    "direct_vs_total",
]

PLOTS = {
    "contribution_distributions": contribution_distributions,
    "detailed_head_analysis": detailed_head_analysis,
    "layer_head_heatmap": layer_head_heatmap,
    "contribution_vs_scale": contribution_vs_scale,
    "screen_map": screen_map,
    "segment_map": segment_map,
    "ablation_curves": ablation_curves,
    "direct_vs_total": direct_vs_total,
}
"""Figure name (its file ``plots/<name>.png``) -> the function that draws it."""


_DRAWING = threading.Lock()
"""One figure at a time in a process: matplotlib's imports and drawing are not thread-safe."""


def plot(name: str, table_path, out_path) -> None:
    """Draw figure ``name`` from the table at ``table_path`` (the contribution table; the
    screen's per-head estimates for ``screen_map``, the curves' points for ``ablation_curves``,
    the direct effects for ``direct_vs_total``)."""
    table, meta = files.read_parquet(table_path), files.read_parquet_metadata(table_path)
    with _DRAWING:
        PLOTS[name](table, meta, out_path)
