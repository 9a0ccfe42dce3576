"""Which figures a run draws, from its config alone: the workflow lists them while it builds the
DAG, before the model's shape is known."""

from __future__ import annotations

from headperturb.core import sets, spec
from headperturb.core.targets import screening


def chosen(config: dict) -> list[str]:
    """The names of the figures (:data:`headperturb.analysis.figures.PLOTS`) that a run of
    ``config`` (validated, its defaults filled) draws, in this order: the distributions and the
    bar chart always; the heatmap when a sweep covers several layers; the scale plot when noise
    has several scales; the screen's map when the screen runs; the segment map when the sweeps
    cover two segments of the prompt or more; the curves when there are curves; direct against
    total effects when direct effects are measured."""
    perturbation = config["perturbation"]
    sweeps = spec.sweeps(perturbation)
    layers = {str(layer) for s in sweeps for layer in _as_list(s["layers"])}
    scales = {
        spec.format_scale(x)
        for s in sweeps
        if any(spec.takes_scale(kind) for kind in s["kinds"])
        for x in s["scales"]
    }
    positions = {p for s in sweeps for p in _as_list(s["positions"])}
    drawn = {
        "contribution_distributions": True,
        "detailed_head_analysis": True,
        "layer_head_heatmap": "all" in layers or len(layers) > 1,
        "contribution_vs_scale": len(scales) > 1,
        "screen_map": bool(screening(config)),
        "segment_map": len(positions & set(spec.SEGMENTS)) > 1,
        "ablation_curves": bool(sets.curves(perturbation)),
        "direct_vs_total": bool(config["direct_effects"]["enabled"]),
    }
    return [name for name, draw in drawn.items() if draw]


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]
