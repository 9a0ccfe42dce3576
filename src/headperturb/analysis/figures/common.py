"""What every figure shares: one style (Okabe-Ito colours, colour-blind safe, the same colour for
a category in every figure, sizes that read in the HTML report and on a slide), a figure without
pyplot, its PNG file, the settings' rows and titles, and the baseline line of the titles."""

from __future__ import annotations

from headperturb.analysis.labels import rows_of, setting_label
from headperturb.core import files

CATEGORY_COLOURS = {"HIGH": "#D55E00", "MEDIUM": "#E69F00", "LOW": "#56B4E9"}
STYLE = {
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "xtick.labelsize": 8,
    "ytick.labelsize": 9,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.dpi": 100,
}

DPI = 150


def subplots(nrows: int, ncols: int, figsize: tuple[float, float], **kwargs):
    """A figure and its axes, without pyplot and its global figure state: the plot jobs run in
    threads of the Snakemake process."""
    import matplotlib
    from matplotlib.figure import Figure

    matplotlib.rcParams.update(STYLE)  # the same values from every thread
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def part(table, combo):
    """The rows of one setting, in layer and head order."""
    return rows_of(table, combo).sort_values(["layer", "head"])


FAMILIES = {
    "run": "q-values: Benjamini-Hochberg over every row of the run",
    "setting": "q-values: Benjamini-Hochberg within each setting",
}
"""How a figure names the family of its q-values (the table's ``correction``)."""


def baseline_text(meta: dict) -> str:
    base = meta.get("baseline", {})
    return (
        f"baseline accuracy {base.get('accuracy', float('nan')):.3f}, "
        f"macro-F1 {base.get('f1', float('nan')):.3f}, ROC AUC {base.get('auc', float('nan')):.3f} "
        f"on {base.get('n_prompts', '?')} prompts; {FAMILIES[meta.get('correction', 'run')]}"
    )


def run_of(path) -> str | None:
    """The run a file belongs to: the folder after ``results`` in its path."""
    from pathlib import Path

    parts = Path(path).parts
    return parts[parts.index("results") + 1] if "results" in parts[:-1] else None


def save(fig, out_path) -> None:
    """The figure as a PNG file, its run named at its foot."""
    run = run_of(out_path)
    if run is not None:
        fig.text(0.0, 0.0, f"run {run}", fontsize=7, color="#555555", ha="left", va="top")
    with files.atomic_path(out_path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png", metadata={"Software": None})


def title(combo) -> str:
    return setting_label(*combo)
