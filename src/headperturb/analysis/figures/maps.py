"""Maps of the heads: layers x heads heatmaps of the run's measurements and of the screen's
estimates, and the segment map (where in the prompt each head acts)."""

from __future__ import annotations

import numpy as np

from headperturb.analysis.figures.common import baseline_text, part, save, subplots, title
from headperturb.analysis.labels import settings
from headperturb.core.spec import position_label


def heatmap_panels(fig, axes, panels, colour_label: str, limit: float | None = None) -> None:
    """Layers x heads panels on one diverging scale centred on zero: ``panels`` is a list of
    (title, grid) or (title, grid, marked) with ``grid`` a layers x heads DataFrame and ``marked``
    a boolean one of the same shape (cells drawn with a dot: significant)."""
    if limit is None:
        limit = max(max(np.nanmax(np.abs(p[1].to_numpy())) for p in panels), 1e-9)
    for ax, panel in zip(axes, panels):
        heading, grid = panel[0], panel[1]
        if not np.isfinite(grid.to_numpy(dtype=float)).any():  # e.g. a patch effect of an ablation
            ax.set_axis_off()
            continue
        image = ax.imshow(
            grid.to_numpy(),
            cmap="PuOr_r",
            vmin=-limit,
            vmax=limit,
            aspect="auto",
            origin="lower",
            interpolation="nearest",
        )
        if len(panel) > 2:
            rows, cols = np.nonzero(panel[2].reindex_like(grid).fillna(False).to_numpy(bool))
            ax.plot(cols, rows, "o", color="black", markersize=2.5, linestyle="none")
        ax.set_xticks(range(len(grid.columns)), grid.columns, fontsize=7)
        step = max(1, len(grid.index) // 16)
        ax.set_yticks(range(0, len(grid.index), step), grid.index[::step], fontsize=7)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.set_title(heading, fontsize=10)
        fig.colorbar(image, ax=ax, label=colour_label)


HEATMAP_METRICS = {
    "contribution_accuracy": ("accuracy contribution (pp); > 0 helps", 100, "q_value"),
    "change_auc": (
        "ROC AUC change (baseline - perturbed);\n> 0: the head helps discriminate",
        1,
        "q_value_auc",
    ),
    "bias_shift": ("mean margin shift (perturbed - baseline)", 1, "effect"),
    "patch_effect": (
        "patch effect (share of the clean-partner\ndifference moved)",
        1,
        "q_value_logit_diff",
    ),
}
"""The heatmap's columns: the column drawn, its colour label, the factor to the plotted unit, and
what marks a cell (a q-value below alpha, or an effect that involves bias)."""


def layer_head_heatmap(table, meta: dict, out_path) -> None:
    """Layers x heads, one row of panels per setting that covers more than one layer: the
    accuracy contribution, the change of the ROC AUC (discrimination), the mean margin shift
    (bias) and, for patching, the patch effect; a dot marks a cell whose q-value is below alpha
    (accuracy, AUC, patching: the logit difference) or whose effect involves bias."""
    every = settings(table)
    combos = [c for c in every if part(table, c)["layer"].nunique() > 1] or every
    patching = any(c[2] in ("patch", "restore") for c in combos)
    columns = [k for k in HEATMAP_METRICS if k != "patch_effect" or patching]
    alpha = meta.get("alpha", 0.05)
    size = (6.0 * len(columns), 5.0 * len(combos))
    fig, axes = subplots(len(combos), len(columns), size, squeeze=False)
    for col, key in enumerate(columns):
        label, factor, mark = HEATMAP_METRICS[key]
        panels = []
        for combo in combos:
            rows = part(table, combo)
            grid = rows.pivot_table(index="layer", columns="head", values=key) * factor
            flags = rows[mark].isin(["bias", "both"]) if mark == "effect" else rows[mark] < alpha
            marked = rows.assign(_m=flags).pivot_table(index="layer", columns="head", values="_m")
            panels.append((title(combo), grid, marked.astype(bool)))
        finite = [
            np.nanmax(np.abs(p[1].to_numpy())) for p in panels if np.isfinite(p[1].to_numpy()).any()
        ]
        heatmap_panels(fig, axes[:, col], panels, label, max(finite + [1e-9]))
    fig.suptitle(
        "By layer and head: accuracy, discrimination (ROC AUC) and bias (margin shift)"
        f"; dots: q < {alpha:g} (bias: the shift alone changes the accuracy)\n"
        + baseline_text(meta),
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    save(fig, out_path)


def screen_map(heads, meta: dict, out_path) -> None:
    """Layers x heads of the screen's first-order estimates of each head's contribution to the
    correct-label logit difference under zero and mean ablation, one panel per setting. Labelled
    as estimates: they choose what to measure, they are not measurements."""
    shown = heads[heads["kind"].isin(["zero", "mean"])]
    combos = sorted(
        set(zip(shown["kind"], shown["position"])), key=lambda c: (c[0] != "zero", c[1])
    )
    fig, axes = subplots(1, len(combos), (6.5 * len(combos), 5.5), squeeze=False)
    panels = []
    for kind, position in combos:
        rows = shown[(shown["kind"] == kind) & (shown["position"] == position)]
        grid = rows.pivot_table(index="layer", columns="head", values="est_logit_diff")
        panels.append((f"ESTIMATE: {kind} ablation, {position_label(position)}", grid))
    heatmap_panels(fig, axes[0], panels, "estimated logit-difference contribution; > 0 helps")
    fig.suptitle(
        "Screen: first-order estimates (one backward pass per prompt), not measurements\n"
        "the heads worth measuring exactly; the run's table holds the measurements",
        fontsize=11,
    )
    save(fig, out_path)


SEGMENT_ROWS = 30
"""The most heads a segment map panel shows (the largest effects at any segment)."""


def segment_map(table, meta: dict, out_path) -> None:
    """Where in the prompt each head acts: per setting, the heads measured at two segments or
    more (rows, largest effect first) against all positions and each segment (columns), coloured
    by the change of the correct-label logit difference (baseline - perturbed; > 0: the head's
    output there helps), the value written in each cell; a dot marks q < alpha."""
    from headperturb.analysis.segments import segment_map as mapped

    alpha = meta.get("alpha", 0.05)
    frame = mapped(table, alpha)
    groups = list(frame.groupby(["site", "kind", "scale"], sort=False))
    if not groups:  # the sweeps cover several segments, but no head at two of them
        _no_segments(out_path)
        return
    height = max(min(len(g), SEGMENT_ROWS) for _, g in groups)
    fig, axes = subplots(1, len(groups), (5.2 * len(groups), 1.2 + 0.32 * height), squeeze=False)
    for ax, (_setting, group) in zip(axes[0], groups):
        _segment_panel(fig, ax, group.head(SEGMENT_ROWS), alpha)
    fig.suptitle(
        "Where in the prompt each head acts: perturbed at all positions, then at one "
        f"segment at a time; dots: q < {alpha:g}\n" + baseline_text(meta),
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / fig.get_figheight()))
    save(fig, out_path)


def _no_segments(out_path) -> None:
    """The segment map of a run without a head measured at two segments: a note saying so."""
    fig, ax = subplots(1, 1, (8, 2))
    ax.set_axis_off()
    note = (
        "No head was measured at two segments of the prompt or more:\n"
        "list the segments in one sweep's positions to map its heads."
    )
    ax.text(0.5, 0.5, note, ha="center", va="center")
    save(fig, out_path)


def _segment_panel(fig, ax, group, alpha: float) -> None:
    """One setting's heads (rows) against all positions and each segment (columns), the value
    written in each cell, a dot where q < alpha."""
    from headperturb.analysis.segments import setting_name, shown

    columns = shown(group)
    grid = group[[f"ld_{p}" for p in columns]].to_numpy(dtype=float)
    limit = max(float(np.nan_to_num(np.nanmax(np.abs(grid)), nan=0.0)), 1e-9)
    image = ax.imshow(
        grid, cmap="PuOr_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest"
    )
    for (r, c), value in np.ndenumerate(grid):
        if np.isfinite(value):
            colour = "white" if abs(value) > 0.6 * limit else "black"
            text = f"{value:+.2g}"
            ax.text(c, r, text, ha="center", va="center", fontsize=7, color=colour)
            if group[f"q_{columns[c]}"].iloc[r] < alpha:
                ax.plot(c + 0.36, r - 0.3, "o", color="black", markersize=2.5)
    segments = [
        position_label(p).replace(" positions", "").replace(" position", "") for p in columns
    ]
    ax.set_xticks(range(len(columns)), segments)
    ax.set_yticks(range(len(group)), [f"L{r.layer}H{r.head}" for r in group.itertuples()])
    ax.set_title(setting_name(group.iloc[0]), fontsize=10)
    ax.spines[:].set_visible(False)
    fig.colorbar(image, ax=ax, label="logit-difference contribution; > 0 helps")
