"""Heads together: the joint-ablation curves, and each head's direct effect against its total
effect (self-repair)."""

from __future__ import annotations

import numpy as np

from headperturb.analysis.figures.common import save, subplots
from headperturb.core.kinds import build
from headperturb.core.spec import position_label

CURVE_METRICS = {
    "logit_diff": ("correct-label logit difference", "ci_low_logit_diff", "ci_high_logit_diff"),
    "auc": ("ROC AUC of the margin", "ci_low_auc", "ci_high_auc"),
    "accuracy": ("accuracy", "ci_low_accuracy", "ci_high_accuracy"),
}
"""The metrics of the curve panels: label and the interval of the change (baseline - value)."""

ORDER_COLOURS = {
    "screen": "#0072B2",
    "exact": "#D55E00",
    "induction": "#E69F00",
    "induction_exclusive": "#F0E442",
    "function_vector": "#009E73",
    "function_vector_exclusive": "#000000",
    "label_attention": "#CC79A7",
}


def ablation_curves(points, meta: dict, out_path) -> None:
    """Joint-ablation curves: per setting (site, positions, kind) and mode, each metric against
    the number of heads removed (``remove``: the k highest-ranked) or kept (``keep``: every other
    head removed), for the ranked orders with 95% intervals and the random orders as a band
    (lowest to highest over the seeds, their median dashed). The unperturbed model and chance are
    horizontal lines."""
    curves = points[points["mode"].isin(["remove", "keep"])]
    combos = sorted(
        set(zip(curves["site"], curves["position"], curves["kind"], curves["mode"])),
        key=lambda c: (c[0], c[1], c[2], c[3] != "remove"),
    )
    n_total = int(meta.get("n_heads_total", curves["k"].max()))
    size = (5.0 * len(CURVE_METRICS), 3.4 * len(combos) + 0.8)
    fig, axes = subplots(len(combos), len(CURVE_METRICS), size, squeeze=False)
    for row, (site, position, kind, mode) in enumerate(combos):
        curve = curves[
            (curves["site"] == site)
            & (curves["position"] == position)
            & (curves["kind"] == kind)
            & (curves["mode"] == mode)
        ]
        heading = f"{build(kind).label()}, {position_label(position)}: {mode}"
        for ax, metric in zip(axes[row], CURVE_METRICS):
            _curve_panel(ax, curve, metric, n_total, heading)
        axes[row, 0].legend(frameon=False, fontsize=7)
    fig.suptitle(
        "Heads removed together: how much of the task survives\n"
        "remove: the k highest-ranked heads ablated; keep: every head but the top k "
        "ablated; bars: 95% intervals",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.8 / fig.get_figheight()))
    save(fig, out_path)


def _curve_panel(ax, curve, metric: str, n_total: int, heading: str) -> None:
    """One curve (one setting and mode) of one metric: the random orders' band, each ranked
    order's line with its intervals, the unperturbed model and chance."""
    from headperturb.analysis.curves import CHANCE, is_random

    label = CURVE_METRICS[metric][0]
    mode = curve["mode"].iloc[0]
    base = float(curve[f"baseline_{metric}"].iloc[0])
    anchor = 0 if mode == "remove" else n_total
    randoms = curve[curve["order"].map(is_random)]
    if not randoms.empty:
        _random_band(ax, randoms, metric, anchor, base)
    for order, group in curve[~curve["order"].map(is_random)].groupby("order"):
        _ranked_line(ax, group.sort_values("k"), order, metric, anchor, base)
    ax.axhline(base, color="black", lw=0.8, ls=":", label="unperturbed")
    ax.axhline(CHANCE[metric], color="#CC79A7", lw=0.8, ls="-.", label="chance")
    ax.set_xscale("symlog", base=2, linthresh=1)  # 0 and 1 linear, then doubling
    _k_ticks(ax, sorted({*curve["k"].astype(int).tolist(), anchor}))
    ax.set_ylabel(label)
    ax.set_title(heading, fontsize=9)
    ax.set_xlabel(f"heads {'removed' if mode == 'remove' else 'kept'} (k) of {n_total}")


def _k_ticks(ax, ks: list[int]) -> None:
    """Ticks at the k the curve has, and no others (the symlog axis's own ticks reach below 0),
    the axis from just below the smallest to just above the largest; labels only where they have
    room: from the largest k down, a label at least 1/11 of the axis from the last one labelled."""
    from matplotlib.ticker import NullLocator

    scale = ax.xaxis.get_transform()
    where = scale.transform([float(k) for k in ks])
    span = float(where.max() - where.min()) or 1.0
    labels, last = [""] * len(ks), None
    for i in range(len(ks) - 1, -1, -1):
        if last is None or last - where[i] >= span / 11:
            labels[i], last = str(ks[i]), where[i]
    ax.set_xticks(ks, labels)
    ax.xaxis.set_minor_locator(NullLocator())
    ends = scale.inverted().transform([where.min() - 0.03 * span, where.max() + 0.03 * span])
    ax.set_xlim(*ends)


def _random_band(ax, randoms, metric: str, anchor: int, base: float) -> None:
    """The random orders: lowest to highest over the seeds, their median dashed, all starting
    from the unperturbed model at ``anchor``."""
    wide = randoms.pivot_table(index="k", columns="order", values=metric)
    wide.loc[anchor] = base
    wide = wide.sort_index()
    ax.fill_between(
        wide.index,
        wide.min(axis=1),
        wide.max(axis=1),
        color="#999999",
        alpha=0.35,
        label=f"random orders ({wide.shape[1]} seeds)",
    )
    ax.plot(wide.index, wide.median(axis=1), color="#666666", ls="--", lw=1)


def _ranked_line(ax, group, order: str, metric: str, anchor: int, base: float) -> None:
    """One ranked order's curve from the unperturbed model at ``anchor``, with 95% intervals."""
    colour = ORDER_COLOURS.get(order, "#009E73")
    _, low, high = CURVE_METRICS[metric]
    k = np.append(group["k"].to_numpy(), anchor)
    value = np.append(group[metric].to_numpy(), base)
    sort = np.argsort(k)
    ax.plot(k[sort], value[sort], marker="o", ms=3, color=colour, label=f"{order} order")
    # the value is baseline - change: its interval is the change's, turned around
    change = group[f"change_{metric}"]
    err = np.clip(np.vstack([group[high] - change, change - group[low]]), 0, None)
    ax.errorbar(group["k"], group[metric], yerr=err, fmt="none", lw=0.8, color=colour)


def direct_vs_total(frame, meta: dict, out_path) -> None:
    """Each head's direct effect (its own write, read at the unembedding with the norms' scales
    frozen) against its total effect (its exact final-position job), one panel per kind: points
    on the diagonal are not repaired; below it (for a helpful head) the rest of the model makes up
    for part of the loss. The heads with the most self-repair are named, the names kept apart."""
    both = frame.dropna(subset=["total_effect"])
    kinds = sorted(both["kind"].unique()) or sorted(frame["kind"].unique())
    fig, axes = subplots(1, len(kinds), (5.6 * len(kinds), 5.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        heads = both[both["kind"] == kind]
        if heads.empty:
            note = "no total effects measured for this kind"
            ax.text(0.5, 0.5, note, ha="center", transform=ax.transAxes)
            continue
        _direct_panel(fig, ax, heads, kind)
    fig.suptitle("Direct against total effect: self-repair = direct - total", fontsize=11)
    fig.tight_layout()
    save(fig, out_path)


def _direct_panel(fig, ax, heads, kind: str) -> None:
    """One kind's heads: direct against total effect, coloured by layer, the diagonal, and the
    six heads with the most self-repair named."""
    points = ax.scatter(
        heads["direct_effect"],
        heads["total_effect"],
        c=heads["layer"],
        cmap="viridis",
        s=14,
        edgecolors="none",
    )
    largest = np.nanmax(np.abs(heads[["direct_effect", "total_effect"]].to_numpy()))
    lim = float(largest) * 1.08 or 1.0
    ax.plot([-lim, lim], [-lim, lim], color="black", lw=0.8, ls=":", label="total = direct")
    ax.axhline(0, color="#999999", lw=0.5)
    ax.axvline(0, color="#999999", lw=0.5)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    repaired = heads.reindex(heads["self_repair"].abs().sort_values(ascending=False).index)
    _name_heads(fig, ax, repaired.head(6))
    ax.set_xlabel(
        "direct effect on the correct-label logit difference\n"
        "(baseline - ablated, direct path only)"
    )
    ax.set_ylabel("total effect (exact final-position ablation)")
    ax.set_title(f"{build(kind).label()} at the final position: {len(heads)} heads", fontsize=9)
    ax.legend(frameon=False, loc="upper left")
    fig.colorbar(points, ax=ax, label="layer")


def _name_heads(fig, ax, rows, fontsize: float = 7) -> None:
    """Each row's head named beside its point, where the name overlaps no name placed before it:
    the first free of the four corners around the point, then further up or down, with a thin
    line back to the point once it has moved away from it."""
    scale = 72.0 / fig.dpi  # display pixels to points
    placed: list[tuple[float, float, float, float]] = []
    for _, row in rows.iterrows():
        name = f"L{int(row['layer'])}H{int(row['head'])}"
        where = (row["direct_effect"], row["total_effect"])
        x, y = ax.transData.transform(where) * scale
        width, height = 0.62 * fontsize * len(name), 1.25 * fontsize
        candidates = _offsets(width, height)
        for i, (dx, dy) in enumerate(candidates):
            box = (x + dx, y + dy, x + dx + width, y + dy + height)
            if not any(_overlap(box, other) for other in placed) or i == len(candidates) - 1:
                break
        placed.append(box)
        arrow = {"arrowstyle": "-", "lw": 0.5, "color": "#666666"} if i >= 4 else None
        ax.annotate(
            name,
            where,
            fontsize=fontsize,
            xytext=(dx, dy),
            textcoords="offset points",
            arrowprops=arrow,
        )


def _offsets(width: float, height: float) -> list[tuple[float, float]]:
    """Where a name may go, in points from its point (its lower left corner), nearest first."""
    corners = [(3, 3), (3, -3 - height), (-3 - width, 3), (-3 - width, -3 - height)]
    up = [(3, 3 + j * height) for j in range(1, 8)]
    down = [(3, -3 - (j + 1) * height) for j in range(1, 8)]
    further = [offset for pair in zip(up, down) for offset in pair]
    return corners + further


def _overlap(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
