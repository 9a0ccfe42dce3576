"""The heads' contribution scores one by one: their distribution per setting, a bar per head,
and the accuracy contribution against the noise scale."""

from __future__ import annotations

import numpy as np

from headperturb.analysis.figures.common import (
    CATEGORY_COLOURS,
    baseline_text,
    part,
    save,
    subplots,
    title,
)
from headperturb.analysis.labels import settings
from headperturb.analysis.scoring import METRICS as TASK_METRICS
from headperturb.analysis.scoring import interval_columns
from headperturb.core.spec import position_label


def metric_names() -> dict[str, str]:
    """The task metrics' names in figures (:data:`headperturb.analysis.scoring.METRICS`)."""
    return {name: metric.label for name, metric in TASK_METRICS.items()}


def _change(name: str) -> tuple[str, str, str]:
    """The run table's columns of a change and its 95% interval."""
    return f"change_{name}", f"ci_low_{name}", f"ci_high_{name}"


def detail() -> dict[str, tuple]:
    """Per panel of the bar chart: the column of the change, its interval, the axis label and the
    factor to the plotted unit; a panel per task metric, and the logit difference."""
    panels = {
        name: (f"contribution_{name}", *interval_columns(name), f"{label} contribution (pp)", 100)
        for name, label in metric_names().items()
    }
    logit_label = "correct-label logit difference\ncontribution (logits)"
    panels["logit_diff"] = (*_change("logit_diff"), logit_label, 1)
    panels["auc"] = (*_change("auc"), "ROC AUC change (discrimination)", 1)
    return panels


def contribution_distributions(table, meta: dict, out_path) -> None:
    """Histograms of the accuracy and F1 contribution scores, stacked by impact category: one row
    per setting (site, positions, noise scale or ablation), which are not pooled since they are
    different interventions."""
    combos = settings(table)
    names = metric_names()
    size = (5.5 * len(names), 3.6 * len(combos) + 0.6)
    fig, axes = subplots(len(combos), len(names), size, sharey="row", squeeze=False)
    for row, combo in enumerate(combos):
        rows = part(table, combo)
        for ax, (metric, name) in zip(axes[row], names.items()):
            _histogram(ax, rows, metric)
            ax.set_title(f"{name}, {title(combo)}: {len(rows)} heads")
        axes[row, 0].set_ylabel("number of heads")
    for ax, name in zip(axes[-1], names.values()):
        ax.set_xlabel(
            f"contribution to {name} (percentage points)\nbaseline - perturbed; > 0: the head helps"
        )
    fig.suptitle("Distribution of head contribution scores\n" + baseline_text(meta), fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / fig.get_figheight()))
    save(fig, out_path)


def _histogram(ax, rows, metric: str) -> None:
    values = 100 * rows[f"contribution_{metric}"].to_numpy()
    lo, hi = min(values.min(), 0.0), max(values.max(), 0.0)
    bins = np.linspace(lo - 0.5, hi + 0.5, min(40, max(8, len(values))) + 1)
    stacks = [
        100 * rows.loc[rows["impact"] == c, f"contribution_{metric}"] for c in CATEGORY_COLOURS
    ]
    ax.hist(
        stacks,
        bins=bins,
        stacked=True,
        color=list(CATEGORY_COLOURS.values()),
        label=[f"{c} impact" for c in CATEGORY_COLOURS],
        edgecolor="white",
        linewidth=0.5,
    )
    mean = values.mean()
    ax.axvline(0, color="black", linewidth=1)
    ax.axvline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:+.2f}")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(frameon=False, fontsize=8, title="impact (on accuracy)", title_fontsize=8)


def _bars(ax, rows, key: str, labels: list[str]) -> None:
    """One bar per head of one setting: a panel of :func:`detail`, with its interval."""
    value_col, lo_col, hi_col, ylabel, factor = detail()[key]
    x = np.arange(len(rows))
    values = factor * rows[value_col].to_numpy()
    colours = [CATEGORY_COLOURS[c] for c in rows["impact"]]
    ax.bar(x, values, color=colours, edgecolor="black", linewidth=0.4)
    ax.plot(x, values, "_", color="black", markersize=10)  # a zero bar still shows
    if lo_col in rows.columns:
        err = np.vstack([values - factor * rows[lo_col], factor * rows[hi_col] - values])
        err = np.clip(err, 0, None)
        ax.errorbar(x, values, yerr=err, fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
    if key == "accuracy" and "significant" in rows.columns:
        top = factor * rows[hi_col] if hi_col in rows.columns else values
        for xi, yi, sig in zip(x, top, rows["significant"]):
            if sig:
                ax.annotate("*", (xi, yi), ha="center", va="bottom", fontsize=12)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, labels, rotation=90 if len(x) > 16 else 0, fontsize=6 if len(x) > 60 else 8)
    ax.set_ylabel(ylabel + "\n> 0 helps, < 0 hurts")
    ax.grid(axis="y", alpha=0.3)


SHOWN = 36
"""At most this many heads per setting in the bar chart: the largest changes (the heatmap shows
them all)."""


def _largest(rows, shown: int = SHOWN):
    """The ``shown`` heads of a setting whose perturbation changed accuracy most (then the logit
    difference), in layer and head order."""
    if len(rows) <= shown:
        return rows
    size = rows.assign(_a=rows["contribution_accuracy"].abs(), _l=rows["change_logit_diff"].abs())
    largest = size.nlargest(shown, ["_a", "_l"]).drop(columns=["_a", "_l"])
    return largest.sort_values(["layer", "head"])


def detailed_head_analysis(table, meta: dict, out_path) -> None:
    """A bar per head and setting: the contribution score, coloured by impact category."""
    combos = settings(table)
    n = max(len(_largest(part(table, c))) for c in combos)
    width = min(40, max(8, 0.3 * n + 3))
    columns = [k for k, v in detail().items() if v[0] in table.columns]
    size = (width * len(columns) / 2, 3.8 * len(combos))
    fig, axes = subplots(len(combos), len(columns), size, squeeze=False)
    for row, combo in enumerate(combos):
        every = part(table, combo)
        shown, heading = _largest(every), title(combo)
        if len(shown) < len(every):
            heading += f": the {len(shown)} largest of {len(every)} heads (all in the heatmap)"
        one_layer = shown["layer"].nunique() == 1
        labels = [
            f"H{h}" if one_layer else f"L{lay}H{h}" for lay, h in zip(shown["layer"], shown["head"])
        ]
        for col, key in enumerate(columns):
            ax = axes[row, col]
            _bars(ax, shown, key, labels)
            if one_layer:
                ax.set_xlabel(f"query head of layer {shown['layer'].iloc[0]}")
            ax.set_title(heading, fontsize=9)
    _category_legend(fig, meta)
    draws = int(table["draws"].max()) if "draws" in table.columns else 1
    fig.suptitle(
        "Head-by-head contribution (baseline - perturbed): mean of "
        f"{draws} noise draw(s), 95% bootstrap intervals, * significant "
        f"(Benjamini-Hochberg q < {meta.get('alpha', 0.05):g})\n" + baseline_text(meta),
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    save(fig, out_path)


def _category_legend(fig, meta: dict) -> None:
    """The impact categories' colours and thresholds, below the panels."""
    from matplotlib.patches import Rectangle

    high, medium = meta.get("high", 10), meta.get("medium", 5)
    ranges = (f"> {high:g}%", f"{medium:g}-{high:g}%", f"< {medium:g}%")
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in CATEGORY_COLOURS.values()]
    labels = [f"{c} (|relative change of accuracy| {r})" for c, r in zip(CATEGORY_COLOURS, ranges)]
    fig.legend(
        handles, labels, loc="lower center", ncol=3, frameon=False, bbox_to_anchor=(0.5, -0.02)
    )


def contribution_vs_scale(table, meta: dict, out_path) -> None:
    """Accuracy contribution against noise scale: a line per head, the mean over heads in black."""
    table = table[table["scale"] != ""]  # the kinds with a scale
    groups = sorted(set(zip(table["site"], table["position"])))
    fig, axes = subplots(1, len(groups), (7 * len(groups), 4.5), squeeze=False)
    for ax, (site, position) in zip(axes[0], groups):
        rows = table[(table["site"] == site) & (table["position"] == position)]
        rows = rows.assign(sigma=rows["scale"].astype(float))
        for _key, g in rows.groupby(["layer", "head"]):
            g = g.sort_values("sigma")
            contribution = 100 * g["contribution_accuracy"]
            ax.plot(g["sigma"], contribution, color="#999999", linewidth=0.8, alpha=0.7)
        mean = rows.groupby("sigma")["contribution_accuracy"].mean() * 100
        ax.plot(
            mean.index,
            mean.to_numpy(),
            color="black",
            linewidth=2.2,
            marker="o",
            label="mean over heads",
        )
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("noise scale (log scale)")
        ax.set_ylabel("accuracy contribution (pp); > 0 helps")
        ax.set_title(
            f"site {site}, {position_label(position)}: one grey line per head", fontsize=10
        )
        ax.legend(frameon=False)
    fig.suptitle("Contribution against noise scale\n" + baseline_text(meta), fontsize=11)
    save(fig, out_path)
