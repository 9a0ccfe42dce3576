"""The figures, from the contribution table alone. Colour-blind-safe colours (Okabe-Ito)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from . import io  # noqa: E402

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
plt.rcParams.update(STYLE)
METRICS = {"accuracy": "accuracy", "f1": "macro-F1"}
# column of the change, its interval, the axis label, the factor to the plotted unit
DETAIL = {
    "accuracy": ("contribution_accuracy", "ci_low", "ci_high", "accuracy contribution (pp)", 100),
    "f1": ("contribution_f1", "ci_low_f1", "ci_high_f1", "macro-F1 contribution (pp)", 100),
    "logit_diff": ("change_logit_diff", "ci_low_logit_diff", "ci_high_logit_diff",
                   "correct-label logit difference\ncontribution (logits)", 1),
}  # fmt: skip
DPI = 150


KIND_ORDER = {"noise": 0, "zero": 1, "mean": 2, "resample": 3}


def _setting_label(site: str, kind: str, scale: str) -> str:
    what = f"noise sigma {scale}" if kind == "noise" else f"{kind} ablation"
    return f"{what}, site {site}"


def _combos(table: pd.DataFrame) -> list[tuple[str, str, str]]:
    """The settings of a run, (site, kind, scale), noise scales ascending, then ablations."""
    combos = table[["site", "kind", "scale"]].drop_duplicates()
    combos = combos.assign(
        _k=combos["kind"].map(KIND_ORDER), _s=pd.to_numeric(combos["scale"], errors="coerce")
    ).sort_values(["site", "_k", "_s"])
    return list(zip(combos["site"], combos["kind"], combos["scale"]))


def _part(table: pd.DataFrame, site: str, kind: str, scale: str) -> pd.DataFrame:
    rows = (table["site"] == site) & (table["kind"] == kind) & (table["scale"] == scale)
    return table[rows].sort_values(["layer", "head"])


def _baseline_text(meta: dict) -> str:
    base = meta.get("baseline", {})
    return (
        f"baseline accuracy {base.get('accuracy', float('nan')):.3f}, "
        f"macro-F1 {base.get('f1', float('nan')):.3f} on {base.get('n_prompts', '?')} prompts"
    )


def _save(fig, out_path) -> None:
    with io.atomic_path(out_path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png")
    plt.close(fig)


def contribution_distributions(table: pd.DataFrame, meta: dict, out_path) -> None:
    """Histograms of the accuracy and F1 contribution scores, stacked by impact category: one row
    per setting (site, noise scale or ablation), which are not pooled since they are different
    interventions."""
    combos = _combos(table)
    fig, axes = plt.subplots(
        len(combos), 2, figsize=(11, 3.6 * len(combos) + 0.6), sharey="row", squeeze=False
    )
    for row, combo in enumerate(combos):
        part = _part(table, *combo)
        for ax, (metric, name) in zip(axes[row], METRICS.items()):
            _histogram(ax, part, metric)
            ax.set_title(f"{name}, {_setting_label(*combo)}: {len(part)} heads")
        axes[row, 0].set_ylabel("number of heads")
    for ax, name in zip(axes[-1], METRICS.values()):
        ax.set_xlabel(f"contribution to {name} (percentage points)\n"
                      "baseline - perturbed; > 0: the head helps")  # fmt: skip
    fig.suptitle("Distribution of head contribution scores\n" + _baseline_text(meta), fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / fig.get_figheight()))
    _save(fig, out_path)


def _histogram(ax, part: pd.DataFrame, metric: str) -> None:
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


def detailed_head_analysis(table: pd.DataFrame, meta: dict, out_path) -> None:
    """A bar per head and setting: the contribution score, coloured by impact category."""
    combos = _combos(table)
    n = len(_part(table, *combos[0]))
    width = min(24, max(8, 0.35 * n + 3))
    columns = [k for k, v in DETAIL.items() if v[0] in table.columns]
    fig, axes = plt.subplots(
        len(combos),
        len(columns),
        figsize=(width * len(columns) / 2, 3.8 * len(combos)),
        squeeze=False,
    )
    for row, combo in enumerate(combos):
        part = _part(table, *combo)
        one_layer = part["layer"].nunique() == 1
        labels = [
            f"H{head}" if one_layer else f"L{layer}H{head}"
            for layer, head in zip(part["layer"], part["head"])
        ]
        x = np.arange(len(part))
        colours = [CATEGORY_COLOURS[c] for c in part["impact"]]
        for col, key in enumerate(columns):
            value_col, lo_col, hi_col, ylabel, factor = DETAIL[key]
            ax = axes[row, col]
            values = factor * part[value_col].to_numpy()
            ax.bar(x, values, color=colours, edgecolor="black", linewidth=0.4)
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
            ax.set_xticks(x, labels, rotation=90 if len(x) > 16 else 0, fontsize=8)
            if one_layer:
                ax.set_xlabel(f"query head of layer {part['layer'].iloc[0]}")
            ax.set_ylabel(ylabel + "\n> 0 helps, < 0 hurts")
            ax.set_title(_setting_label(*combo), fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in CATEGORY_COLOURS.values()]
    labels = [f"{c} (|relative change of accuracy| {rng})" for c, rng in
              zip(CATEGORY_COLOURS, (f"> {meta.get('high', 10):g}%",
                                     f"{meta.get('medium', 5):g}-{meta.get('high', 10):g}%",
                                     f"< {meta.get('medium', 5):g}%"))]  # fmt: skip
    fig.legend(
        handles, labels, loc="lower center", ncol=3, frameon=False, bbox_to_anchor=(0.5, -0.02)
    )
    draws = int(table["draws"].max()) if "draws" in table.columns else 1
    fig.suptitle(
        "Head-by-head contribution (baseline - perturbed): mean of "
        f"{draws} noise draw(s), 95% bootstrap intervals, * significant "
        f"(Benjamini-Hochberg q < {meta.get('alpha', 0.05):g})\n" + _baseline_text(meta),
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _save(fig, out_path)


def layer_head_heatmap(table: pd.DataFrame, meta: dict, out_path) -> None:
    """Layers x heads, coloured by the accuracy contribution, diverging scale centred on zero."""
    combos = _combos(table)
    fig, axes = plt.subplots(1, len(combos), figsize=(6.5 * len(combos), 5), squeeze=False)
    limit = max(100 * table["contribution_accuracy"].abs().max(), 1e-9)
    for ax, combo in zip(axes[0], combos):
        part = _part(table, *combo)
        grid = part.pivot_table(index="layer", columns="head", values="contribution_accuracy") * 100
        image = ax.imshow(grid.to_numpy(), cmap="PuOr_r", vmin=-limit, vmax=limit, aspect="auto",
                          origin="lower", interpolation="nearest")  # fmt: skip
        ax.set_xticks(range(len(grid.columns)), grid.columns, fontsize=7)
        ax.set_yticks(range(len(grid.index)), grid.index, fontsize=7)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.set_title(_setting_label(*combo), fontsize=10)
        fig.colorbar(image, ax=ax, label="accuracy contribution (pp); > 0 helps")
    fig.suptitle("Accuracy contribution by layer and head\n" + _baseline_text(meta), fontsize=11)
    _save(fig, out_path)


def contribution_vs_scale(table: pd.DataFrame, meta: dict, out_path) -> None:
    """Accuracy contribution against noise scale: a line per head, the mean over heads in black."""
    table = table[table["kind"] == "noise"]
    sites = sorted(table["site"].unique())
    fig, axes = plt.subplots(1, len(sites), figsize=(7 * len(sites), 4.5), squeeze=False)
    for ax, site in zip(axes[0], sites):
        part = table[table["site"] == site].assign(sigma=lambda t: t["scale"].astype(float))
        for _key, g in part.groupby(["layer", "head"]):
            g = g.sort_values("sigma")
            ax.plot(
                g["sigma"],
                100 * g["contribution_accuracy"],
                color="#999999",
                linewidth=0.8,
                alpha=0.7,
            )
        mean = part.groupby("sigma")["contribution_accuracy"].mean() * 100
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
        ax.set_xlabel("noise standard deviation sigma (log scale)")
        ax.set_ylabel("accuracy contribution (pp); > 0 helps")
        ax.set_title(f"site {site}: one grey line per head", fontsize=10)
        ax.legend(frameon=False)
    fig.suptitle("Contribution against noise scale\n" + _baseline_text(meta), fontsize=11)
    _save(fig, out_path)


PLOTS = {
    "plot_distributions": contribution_distributions,
    "plot_heads": detailed_head_analysis,
    "plot_heatmap": layer_head_heatmap,
    "plot_scales": contribution_vs_scale,
}


def plot_for_rule(rule: str, table_path, out_path) -> None:
    table = pd.read_parquet(table_path)
    meta = io.read_parquet_metadata(table_path)
    PLOTS[rule](table, meta, out_path)
