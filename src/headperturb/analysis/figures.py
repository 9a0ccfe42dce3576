"""The figures, from the contribution table alone. Colour-blind-safe colours (Okabe-Ito).

:data:`PLOTS` maps each figure's name (its file ``plots/<name>.png``) to the function that draws
it; a new figure is one function registered there. matplotlib and pandas are imported when a
figure is drawn, so the workflow can list the figures without them.
"""

from __future__ import annotations

import threading

import numpy as np

from headperturb.analysis.labels import rows_of, setting_label, settings
from headperturb.analysis.scoring import METRICS as TASK_METRICS
from headperturb.analysis.scoring import interval_columns
from headperturb.core import files
from headperturb.core.kinds import build
from headperturb.core.spec import position_label

# One style for every figure: Okabe-Ito colours (colour-blind safe), the same colour for a
# category in every figure, sizes that read in the HTML report and on a slide.
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


def metric_names() -> dict[str, str]:
    """The task metrics' names in figures (:data:`headperturb.analysis.scoring.METRICS`)."""
    return {name: metric.label for name, metric in TASK_METRICS.items()}


def detail() -> dict[str, tuple]:
    """Per panel of the bar chart: the column of the change, its interval, the axis label and the
    factor to the plotted unit; a panel per task metric, and the logit difference."""
    panels = {name: (f"contribution_{name}", *interval_columns(name),
                     f"{label} contribution (pp)", 100) for name, label in metric_names().items()}  # fmt: skip
    panels["logit_diff"] = ("change_logit_diff", "ci_low_logit_diff", "ci_high_logit_diff",
                            "correct-label logit difference\ncontribution (logits)", 1)  # fmt: skip
    panels["auc"] = ("change_auc", "ci_low_auc", "ci_high_auc",
                     "ROC AUC change (discrimination)", 1)  # fmt: skip
    return panels


DPI = 150


def _subplots(nrows: int, ncols: int, figsize: tuple[float, float], **kwargs):
    """A figure and its axes, without pyplot and its global figure state: the plot jobs run in
    threads of the Snakemake process."""
    import matplotlib
    from matplotlib.figure import Figure

    matplotlib.rcParams.update(STYLE)  # the same values from every thread
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def _part(table, combo):
    return rows_of(table, combo).sort_values(["layer", "head"])


def _baseline_text(meta: dict) -> str:
    base = meta.get("baseline", {})
    return (
        f"baseline accuracy {base.get('accuracy', float('nan')):.3f}, "
        f"macro-F1 {base.get('f1', float('nan')):.3f}, ROC AUC {base.get('auc', float('nan')):.3f} "
        f"on {base.get('n_prompts', '?')} prompts"
    )


def _save(fig, out_path) -> None:
    with files.atomic_path(out_path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png", metadata={"Software": None})


def _title(combo) -> str:
    return setting_label(*combo)


def contribution_distributions(table, meta: dict, out_path) -> None:
    """Histograms of the accuracy and F1 contribution scores, stacked by impact category: one row
    per setting (site, positions, noise scale or ablation), which are not pooled since they are
    different interventions."""
    combos = settings(table)
    fig, axes = _subplots(len(combos), len(metric_names()), (5.5 * len(metric_names()), 3.6 * len(combos) + 0.6),
                          sharey="row", squeeze=False)  # fmt: skip
    for row, combo in enumerate(combos):
        part = _part(table, combo)
        for ax, (metric, name) in zip(axes[row], metric_names().items()):
            _histogram(ax, part, metric)
            ax.set_title(f"{name}, {_title(combo)}: {len(part)} heads")
        axes[row, 0].set_ylabel("number of heads")
    for ax, name in zip(axes[-1], metric_names().values()):
        ax.set_xlabel(f"contribution to {name} (percentage points)\n"
                      "baseline - perturbed; > 0: the head helps")  # fmt: skip
    fig.suptitle("Distribution of head contribution scores\n" + _baseline_text(meta), fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / fig.get_figheight()))
    _save(fig, out_path)


def _histogram(ax, part, metric: str) -> None:
    values = 100 * part[f"contribution_{metric}"].to_numpy()
    lo, hi = min(values.min(), 0.0), max(values.max(), 0.0)
    bins = np.linspace(lo - 0.5, hi + 0.5, min(40, max(8, len(values))) + 1)
    stacks = [
        100 * part.loc[part["impact"] == c, f"contribution_{metric}"] for c in CATEGORY_COLOURS
    ]
    ax.hist(stacks, bins=bins, stacked=True, color=list(CATEGORY_COLOURS.values()),
            label=[f"{c} impact" for c in CATEGORY_COLOURS], edgecolor="white", linewidth=0.5)  # fmt: skip
    ax.axvline(0, color="black", linewidth=1)
    ax.axvline(values.mean(), color="black", linestyle="--", linewidth=1,
               label=f"mean {values.mean():+.2f}")  # fmt: skip
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(frameon=False, fontsize=8, title="impact (on accuracy)", title_fontsize=8)


def _bars(ax, part, key: str, labels: list[str]) -> None:
    """One bar per head of one setting: a panel of :func:`detail`, with its interval."""
    value_col, lo_col, hi_col, ylabel, factor = detail()[key]
    x = np.arange(len(part))
    values = factor * part[value_col].to_numpy()
    ax.bar(x, values, color=[CATEGORY_COLOURS[c] for c in part["impact"]], edgecolor="black",
           linewidth=0.4)  # fmt: skip
    ax.plot(x, values, "_", color="black", markersize=10)  # a zero bar still shows
    if lo_col in part.columns:
        err = np.vstack([values - factor * part[lo_col], factor * part[hi_col] - values])
        ax.errorbar(x, values, yerr=np.clip(err, 0, None), fmt="none", ecolor="black",
                    elinewidth=0.8, capsize=2)  # fmt: skip
    if key == "accuracy" and "significant" in part.columns:
        top = factor * part[hi_col] if hi_col in part.columns else values
        for xi, yi, sig in zip(x, top, part["significant"]):
            if sig:
                ax.annotate("*", (xi, yi), ha="center", va="bottom", fontsize=12)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, labels, rotation=90 if len(x) > 16 else 0, fontsize=6 if len(x) > 60 else 8)
    ax.set_ylabel(ylabel + "\n> 0 helps, < 0 hurts")
    ax.grid(axis="y", alpha=0.3)


SHOWN = 36
"""At most this many heads per setting in the bar chart: the largest changes (the heatmap shows
them all)."""


def _largest(part, shown: int = SHOWN):
    """The ``shown`` heads of a setting whose perturbation changed accuracy most (then the logit
    difference), in layer and head order."""
    if len(part) <= shown:
        return part
    size = part.assign(_a=part["contribution_accuracy"].abs(), _l=part["change_logit_diff"].abs())
    return (
        size.nlargest(shown, ["_a", "_l"]).drop(columns=["_a", "_l"]).sort_values(["layer", "head"])
    )


def detailed_head_analysis(table, meta: dict, out_path) -> None:
    """A bar per head and setting: the contribution score, coloured by impact category."""
    from matplotlib.patches import Rectangle

    combos = settings(table)
    n = max(len(_largest(_part(table, c))) for c in combos)
    width = min(40, max(8, 0.3 * n + 3))
    columns = [k for k, v in detail().items() if v[0] in table.columns]
    fig, axes = _subplots(len(combos), len(columns), (width * len(columns) / 2, 3.8 * len(combos)),
                          squeeze=False)  # fmt: skip
    for row, combo in enumerate(combos):
        part, title = _largest(_part(table, combo)), _title(combo)
        if len(part) < len(_part(table, combo)):
            title += f": the {len(part)} largest of {len(_part(table, combo))} heads (all in the heatmap)"
        one_layer = part["layer"].nunique() == 1
        labels = [
            f"H{h}" if one_layer else f"L{lay}H{h}" for lay, h in zip(part["layer"], part["head"])
        ]
        for col, key in enumerate(columns):
            ax = axes[row, col]
            _bars(ax, part, key, labels)
            if one_layer:
                ax.set_xlabel(f"query head of layer {part['layer'].iloc[0]}")
            ax.set_title(title, fontsize=9)
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in CATEGORY_COLOURS.values()]
    labels = [f"{c} (|relative change of accuracy| {rng})" for c, rng in
              zip(CATEGORY_COLOURS, (f"> {meta.get('high', 10):g}%",
                                     f"{meta.get('medium', 5):g}-{meta.get('high', 10):g}%",
                                     f"< {meta.get('medium', 5):g}%"))]  # fmt: skip
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False,
               bbox_to_anchor=(0.5, -0.02))  # fmt: skip
    draws = int(table["draws"].max()) if "draws" in table.columns else 1
    fig.suptitle(
        "Head-by-head contribution (baseline - perturbed): mean of "
        f"{draws} noise draw(s), 95% bootstrap intervals, * significant "
        f"(Benjamini-Hochberg q < {meta.get('alpha', 0.05):g})\n" + _baseline_text(meta),
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _save(fig, out_path)


def heatmap_panels(fig, axes, panels, colour_label: str, limit: float | None = None) -> None:
    """Layers x heads panels on one diverging scale centred on zero: ``panels`` is a list of
    (title, grid) or (title, grid, marked) with ``grid`` a layers x heads DataFrame and ``marked``
    a boolean one of the same shape (cells drawn with a dot: significant)."""
    if limit is None:
        limit = max(max(np.nanmax(np.abs(p[1].to_numpy())) for p in panels), 1e-9)
    for ax, panel in zip(axes, panels):
        title, grid = panel[0], panel[1]
        if not np.isfinite(grid.to_numpy(dtype=float)).any():  # e.g. a patch effect of an ablation
            ax.set_axis_off()
            continue
        image = ax.imshow(grid.to_numpy(), cmap="PuOr_r", vmin=-limit, vmax=limit, aspect="auto",
                          origin="lower", interpolation="nearest")  # fmt: skip
        if len(panel) > 2:
            rows, cols = np.nonzero(panel[2].reindex_like(grid).fillna(False).to_numpy(bool))
            ax.plot(cols, rows, "o", color="black", markersize=2.5, linestyle="none")
        ax.set_xticks(range(len(grid.columns)), grid.columns, fontsize=7)
        step = max(1, len(grid.index) // 16)
        ax.set_yticks(range(0, len(grid.index), step), grid.index[::step], fontsize=7)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=10)
        fig.colorbar(image, ax=ax, label=colour_label)


HEATMAP_METRICS = {
    "contribution_accuracy": ("accuracy contribution (pp); > 0 helps", 100, "q_value"),
    "change_auc": ("ROC AUC change (baseline - perturbed);\n> 0: the head helps discriminate", 1,
                   "q_value_auc"),
    "bias_shift": ("mean margin shift (perturbed - baseline)", 1, "effect"),
    "patch_effect": ("patch effect (share of the clean-partner\ndifference moved)", 1,
                     "q_value_logit_diff"),
}  # fmt: skip
"""The heatmap's columns: the column drawn, its colour label, the factor to the plotted unit, and
what marks a cell (a q-value below alpha, or an effect that involves bias)."""


def layer_head_heatmap(table, meta: dict, out_path) -> None:
    """Layers x heads, one row of panels per setting that covers more than one layer: the
    accuracy contribution, the change of the ROC AUC (discrimination), the mean margin shift
    (bias) and, for patching, the patch effect; a dot marks a cell whose q-value is below alpha
    (accuracy, AUC, patching: the logit difference) or whose effect involves bias."""
    combos = [c for c in settings(table) if _part(table, c)["layer"].nunique() > 1] or settings(
        table
    )
    patching = any(c[2] in ("patch", "restore") for c in combos)
    columns = [k for k in HEATMAP_METRICS if k != "patch_effect" or patching]
    alpha = meta.get("alpha", 0.05)
    fig, axes = _subplots(len(combos), len(columns), (6.0 * len(columns), 5.0 * len(combos)),
                          squeeze=False)  # fmt: skip
    for col, key in enumerate(columns):
        label, factor, mark = HEATMAP_METRICS[key]
        panels = []
        for combo in combos:
            part = _part(table, combo)
            grid = part.pivot_table(index="layer", columns="head", values=key) * factor
            flags = (part[mark].isin(["bias", "both"]) if mark == "effect"
                     else part[mark] < alpha)  # fmt: skip
            marked = part.assign(_m=flags).pivot_table(index="layer", columns="head", values="_m")
            panels.append((_title(combo), grid, marked.astype(bool)))
        finite = [
            np.nanmax(np.abs(p[1].to_numpy())) for p in panels if np.isfinite(p[1].to_numpy()).any()
        ]
        heatmap_panels(fig, axes[:, col], panels, label, max(finite + [1e-9]))
    fig.suptitle("By layer and head: accuracy, discrimination (ROC AUC) and bias (margin shift)"
                 f"; dots: q < {alpha:g} (bias: the shift alone changes the accuracy)\n"
                 + _baseline_text(meta), fontsize=11)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    _save(fig, out_path)


def contribution_vs_scale(table, meta: dict, out_path) -> None:
    """Accuracy contribution against noise scale: a line per head, the mean over heads in black."""
    table = table[table["scale"] != ""]  # the kinds with a scale
    groups = sorted(set(zip(table["site"], table["position"])))
    fig, axes = _subplots(1, len(groups), (7 * len(groups), 4.5), squeeze=False)
    for ax, (site, position) in zip(axes[0], groups):
        part = table[(table["site"] == site) & (table["position"] == position)]
        part = part.assign(sigma=part["scale"].astype(float))
        for _key, g in part.groupby(["layer", "head"]):
            g = g.sort_values("sigma")
            ax.plot(g["sigma"], 100 * g["contribution_accuracy"], color="#999999", linewidth=0.8,
                    alpha=0.7)  # fmt: skip
        mean = part.groupby("sigma")["contribution_accuracy"].mean() * 100
        ax.plot(mean.index, mean.to_numpy(), color="black", linewidth=2.2, marker="o",
                label="mean over heads")  # fmt: skip
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("noise scale (log scale)")
        ax.set_ylabel("accuracy contribution (pp); > 0 helps")
        ax.set_title(
            f"site {site}, {position_label(position)}: one grey line per head", fontsize=10
        )
        ax.legend(frameon=False)
    fig.suptitle("Contribution against noise scale\n" + _baseline_text(meta), fontsize=11)
    _save(fig, out_path)


def screen_map(heads, meta: dict, out_path) -> None:
    """Layers x heads of the screen's first-order estimates of each head's contribution to the
    correct-label logit difference under zero and mean ablation, one panel per setting. Labelled
    as estimates: they choose what to measure, they are not measurements."""
    shown = heads[heads["kind"].isin(["zero", "mean"])]
    combos = sorted(
        set(zip(shown["kind"], shown["position"])), key=lambda c: (c[0] != "zero", c[1])
    )
    fig, axes = _subplots(1, len(combos), (6.5 * len(combos), 5.5), squeeze=False)
    panels = []
    for kind, position in combos:
        part = shown[(shown["kind"] == kind) & (shown["position"] == position)]
        grid = part.pivot_table(index="layer", columns="head", values="est_logit_diff")
        panels.append((f"ESTIMATE: {kind} ablation, {position_label(position)}", grid))
    heatmap_panels(fig, axes[0], panels, "estimated logit-difference contribution; > 0 helps")
    fig.suptitle("Screen: first-order estimates (one backward pass per prompt), not measurements\n"
                 "the heads worth measuring exactly; the run's table holds the measurements",
                 fontsize=11)  # fmt: skip
    _save(fig, out_path)


SEGMENT_ROWS = 30
"""The most heads a segment map panel shows (the largest effects at any segment)."""


def segment_map(table, meta: dict, out_path) -> None:
    """Where in the prompt each head acts: per setting, the heads measured at two segments or
    more (rows, largest effect first) against all positions and each segment (columns), coloured
    by the change of the correct-label logit difference (baseline - perturbed; > 0: the head's
    output there helps), the value written in each cell; a dot marks q < alpha."""
    from headperturb.analysis.segments import SHOWN, setting_name
    from headperturb.analysis.segments import segment_map as mapped

    alpha = meta.get("alpha", 0.05)
    frame = mapped(table, alpha)
    groups = list(frame.groupby(["site", "kind", "scale"], sort=False))
    if not groups:  # the sweeps cover several segments, but no head at two of them
        fig, ax = _subplots(1, 1, (8, 2))
        ax.set_axis_off()
        ax.text(0.5, 0.5, "No head was measured at two segments of the prompt or more:\n"
                "list the segments in one sweep's positions to map its heads.", ha="center",
                va="center")  # fmt: skip
        _save(fig, out_path)
        return
    height = max(min(len(g), SEGMENT_ROWS) for _, g in groups)
    fig, axes = _subplots(1, len(groups), (5.2 * len(groups), 1.2 + 0.32 * height), squeeze=False)
    for ax, (_setting, group) in zip(axes[0], groups):
        group = group.head(SEGMENT_ROWS)
        grid = group[[f"ld_{p}" for p in SHOWN]].to_numpy(dtype=float)
        limit = max(float(np.nan_to_num(np.nanmax(np.abs(grid)), nan=0.0)), 1e-9)
        image = ax.imshow(grid, cmap="PuOr_r", vmin=-limit, vmax=limit, aspect="auto",
                          interpolation="nearest")  # fmt: skip
        for (r, c), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(c, r, f"{value:+.2g}", ha="center", va="center", fontsize=7,
                        color="white" if abs(value) > 0.6 * limit else "black")  # fmt: skip
                if group[f"q_{SHOWN[c]}"].iloc[r] < alpha:
                    ax.plot(c + 0.36, r - 0.3, "o", color="black", markersize=2.5)
        ax.set_xticks(range(len(SHOWN)), [position_label(p).replace(" positions", "").replace(
            " position", "") for p in SHOWN])  # fmt: skip
        ax.set_yticks(range(len(group)), [f"L{r.layer}H{r.head}" for r in group.itertuples()])
        ax.set_title(setting_name(group.iloc[0]), fontsize=10)
        ax.spines[:].set_visible(False)
        fig.colorbar(image, ax=ax, label="logit-difference contribution; > 0 helps")
    fig.suptitle("Where in the prompt each head acts: perturbed at all positions, then at one "
                 f"segment at a time; dots: q < {alpha:g}\n" + _baseline_text(meta), fontsize=11)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / fig.get_figheight()))
    _save(fig, out_path)


CURVE_METRICS = {
    "logit_diff": ("correct-label logit difference", "ci_low_logit_diff", "ci_high_logit_diff"),
    "auc": ("ROC AUC of the margin", "ci_low_auc", "ci_high_auc"),
    "accuracy": ("accuracy", "ci_low_accuracy", "ci_high_accuracy"),
}
"""The metrics of the curve panels: label and the interval of the change (baseline - value)."""

ORDER_COLOURS = {"screen": "#0072B2", "exact": "#D55E00"}


def ablation_curves(points, meta: dict, out_path) -> None:
    """Joint-ablation curves: per setting (site, positions, kind) and mode, each metric against
    the number of heads removed (``remove``: the k highest-ranked) or kept (``keep``: every other
    head removed), for the ranked orders with 95% intervals and the random orders as a band
    (lowest to highest over the seeds, their median dashed). The unperturbed model and chance are
    horizontal lines."""
    from headperturb.analysis.curves import CHANCE, is_random

    curves = points[points["mode"].isin(["remove", "keep"])]
    combos = sorted(set(zip(curves["site"], curves["position"], curves["kind"], curves["mode"])),
                    key=lambda c: (c[0], c[1], c[2], c[3] != "remove"))  # fmt: skip
    n_total = int(meta.get("n_heads_total", curves["k"].max()))
    fig, axes = _subplots(len(combos), len(CURVE_METRICS), (5.0 * len(CURVE_METRICS), 3.4 * len(combos) + 0.8),
                          squeeze=False)  # fmt: skip
    for row, (site, position, kind, mode) in enumerate(combos):
        part = curves[(curves["site"] == site) & (curves["position"] == position)
                      & (curves["kind"] == kind) & (curves["mode"] == mode)]  # fmt: skip
        for ax, (metric, (label, low, high)) in zip(axes[row], CURVE_METRICS.items()):
            base = float(part[f"baseline_{metric}"].iloc[0])
            anchor = 0 if mode == "remove" else n_total
            randoms = part[part["order"].map(is_random)]
            if not randoms.empty:
                wide = randoms.pivot_table(index="k", columns="order", values=metric)
                wide.loc[anchor] = base
                wide = wide.sort_index()
                ax.fill_between(wide.index, wide.min(axis=1), wide.max(axis=1), color="#999999",
                                alpha=0.35, label=f"random orders ({wide.shape[1]} seeds)")  # fmt: skip
                ax.plot(wide.index, wide.median(axis=1), color="#666666", ls="--", lw=1)
            for order, group in part[~part["order"].map(is_random)].groupby("order"):
                group = group.sort_values("k")
                k = np.append(group["k"].to_numpy(), anchor)
                value = np.append(group[metric].to_numpy(), base)
                sort = np.argsort(k)
                ax.plot(k[sort], value[sort], marker="o", ms=3, color=ORDER_COLOURS.get(order, "#009E73"),
                        label=f"{order} order")  # fmt: skip
                # the value is baseline - change: its interval is the change's, turned around
                change = group[f"change_{metric}"]
                err = np.clip(np.vstack([group[high] - change, change - group[low]]), 0, None)
                ax.errorbar(group["k"], group[metric], yerr=err, fmt="none", lw=0.8,
                            color=ORDER_COLOURS.get(order, "#009E73"))  # fmt: skip
            ax.axhline(base, color="black", lw=0.8, ls=":", label="unperturbed")
            ax.axhline(CHANCE[metric], color="#CC79A7", lw=0.8, ls="-.", label="chance")
            ax.set_xscale("symlog", base=2, linthresh=1)  # 0 and 1 linear, then doubling
            ax.set_ylabel(label)
            ax.set_title(f"{build(kind).label()}, {position_label(position)}: {mode}", fontsize=9)
            ax.set_xlabel(f"heads {'removed' if mode == 'remove' else 'kept'} (k) of {n_total}")
        axes[row, 0].legend(frameon=False, fontsize=7)
    fig.suptitle("Heads removed together: how much of the task survives\n"
                 "remove: the k highest-ranked heads ablated; keep: every head but the top k "
                 "ablated; bars: 95% intervals", fontsize=11)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.8 / fig.get_figheight()))
    _save(fig, out_path)


def direct_vs_total(frame, meta: dict, out_path) -> None:
    """Each head's direct effect (its own write, read at the unembedding with the norms' scales
    frozen) against its total effect (its exact final-position job), one panel per kind: points
    on the diagonal are not repaired; below it (for a helpful head) the rest of the model makes up
    for part of the loss. The heads with the most self-repair are named."""
    both = frame.dropna(subset=["total_effect"])
    kinds = sorted(both["kind"].unique()) or sorted(frame["kind"].unique())
    fig, axes = _subplots(1, len(kinds), (5.6 * len(kinds), 5.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        part = both[both["kind"] == kind]
        if part.empty:
            ax.text(
                0.5,
                0.5,
                "no total effects measured for this kind",
                ha="center",
                transform=ax.transAxes,
            )
            continue
        points = ax.scatter(part["direct_effect"], part["total_effect"], c=part["layer"], cmap="viridis",
                            s=14, edgecolors="none")  # fmt: skip
        lim = (
            float(np.nanmax(np.abs(part[["direct_effect", "total_effect"]].to_numpy()))) * 1.08
            or 1.0
        )
        ax.plot([-lim, lim], [-lim, lim], color="black", lw=0.8, ls=":", label="total = direct")
        ax.axhline(0, color="#999999", lw=0.5)
        ax.axvline(0, color="#999999", lw=0.5)
        for _, row in (
            part.reindex(part["self_repair"].abs().sort_values(ascending=False).index)
            .head(6)
            .iterrows()
        ):
            ax.annotate(f"L{int(row['layer'])}H{int(row['head'])}", (row["direct_effect"], row["total_effect"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")  # fmt: skip
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_xlabel(
            "direct effect on the correct-label logit difference\n(baseline - ablated, direct path only)"
        )
        ax.set_ylabel("total effect (exact final-position ablation)")
        ax.set_title(f"{build(kind).label()} at the final position: {len(part)} heads", fontsize=9)
        ax.legend(frameon=False, loc="upper left")
        fig.colorbar(points, ax=ax, label="layer")
    fig.suptitle("Direct against total effect: self-repair = direct - total", fontsize=11)
    fig.tight_layout()
    _save(fig, out_path)


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
