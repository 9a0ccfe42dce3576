"""Heads together: the joint-ablation curves against the random control, and direct effects
against total effects (self-repair)."""

from __future__ import annotations

import pandas as pd

from headperturb.analysis.summary.common import ci, kind_label, table_head, table_row
from headperturb.core.spec import position_label


def curves(points: pd.DataFrame, band: pd.DataFrame, n_total: int) -> list[str]:
    """Per setting: how many heads the task needs, by each order against the random control, and
    the interaction of the top heads."""
    lines = [
        "## Heads removed together (joint-ablation curves)",
        "",
        f"The k highest-ranked of the model's {n_total} heads ablated together (remove), or "
        "every head but them (keep). Cells: the smallest k of the grid whose removal leaves "
        "at most half of the baseline's margin above chance (remove), or whose keeping "
        "retains at least half (keep), and the normalised area under the retained share "
        "(remove: smaller means the order finds what matters sooner; keep: larger means fewer "
        "heads suffice); random orders: median [lowest-highest] over the seeds. "
        "`curves/points.csv` holds every point with its 95% intervals.",
    ]
    for (site, position, kind), part in band.groupby(["site", "position", "kind"], sort=True):
        lines += ["", f"**{kind_label(kind)}, {position_label(position)} ({site})**", ""]
        lines += _curve_table(part) + _faithfulness(part)
        setting = points[
            (points["site"] == site) & (points["position"] == position) & (points["kind"] == kind)
        ]
        lines += _every_head(setting) + _interaction(setting)
    return lines


def _curve_table(band: pd.DataFrame) -> list[str]:
    """A setting's orders: the k for half and the area, removing and keeping."""
    orders = [o for o in band["order"].unique() if o != "random"] + (
        ["random"] if (band["order"] == "random").any() else []
    )
    lines = table_head(
        "order",
        "remove: k for half the logit difference",
        "remove: k for half the AUC",
        "keep: k for half the logit difference",
        "keep: k for half the AUC",
    )
    for order in orders:
        cells = [
            _curve_cell(band, order, mode, metric)
            for mode in ("remove", "keep")
            for metric in ("logit_diff", "auc")
        ]
        lines.append(table_row(order, *cells))
    return lines


METRICS = {"logit_diff": "logit difference", "auc": "ROC AUC"}


def _faithfulness(band: pd.DataFrame) -> list[str]:
    """MIB's faithfulness of a setting's keep curves on MIB's sizes: each order's CPR and CMD
    with their intervals, beside the random orders' median [lowest-highest]."""
    keep = band[(band["mode"] == "keep") & band["cpr"].notna()] if "cpr" in band else band[:0]
    if keep.empty:
        return []
    lines = [
        "",
        "MIB's faithfulness of the kept heads (the keep curves on MIB's circuit sizes, "
        "`ks: mib`; CPR: area under f, higher is better; CMD: area under |1 - f|, lower is "
        "better; 95% intervals from the paired bootstrap; random orders: median "
        "[lowest-highest] over the seeds):",
        "",
        *table_head("order", "metric", "CPR", "CMD", "random CPR", "random CMD"),
    ]
    for row in keep.sort_values(["metric", "order"]).to_dict("records"):
        if row["order"] == "random":
            continue
        lines.append(
            table_row(
                row["order"],
                METRICS.get(row["metric"], row["metric"]),
                ci(row, "cpr", "ci_low_cpr", "ci_high_cpr", digits=2),
                ci(row, "cmd", "ci_low_cmd", "ci_high_cmd", digits=2),
                _band(row, "cpr"),
                _band(row, "cmd"),
            )
        )
    return lines


def _band(row: dict, measure: str) -> str:
    """The random orders' median [lowest-highest] of ``measure``."""
    median, low, high = (row[f"random_{measure}_{q}"] for q in ("median", "low", "high"))
    return "-" if pd.isna(median) else f"{median:.2f} [{low:.2f}-{high:.2f}]"


def _curve_cell(band: pd.DataFrame, order: str, mode: str, metric: str) -> str:
    row = band[(band["order"] == order) & (band["mode"] == mode) & (band["metric"] == metric)]
    if row.empty:
        return "-"
    row = row.iloc[0]
    if pd.isna(row["area"]):
        return "n/a (baseline not above chance)"
    k = "none" if pd.isna(row["k_half"]) else f"{int(row['k_half'])}"
    if order != "random":
        return f"{k} (area {row['area']:.2f})"
    low, high = row["random_k_half_low"], row["random_k_half_high"]
    spread = "" if pd.isna(low) else f" [{int(low)}-{int(high)}]" if pd.notna(high) else ""
    areas = f"{row['random_area_low']:.2f}-{row['random_area_high']:.2f}"
    return f"{k}{spread} (area {row['area']:.2f} [{areas}])"


def _every_head(setting: pd.DataFrame) -> list[str]:
    """What is left with every head of the setting ablated (keep none), when the run has it."""
    every = setting[(setting["mode"] == "keep") & (setting["k"] == 0)]
    if every.empty:
        return []
    r = every.iloc[0]
    return [
        "",
        f"Every head ablated: correct-label logit difference {r['logit_diff']:+.2f} "
        f"(baseline {r['baseline_logit_diff']:+.2f}), AUC {r['auc']:.3f} "
        f"(baseline {r['baseline_auc']:.3f}), accuracy {r['accuracy']:.3f}.",
    ]


def _interaction(setting: pd.DataFrame) -> list[str]:
    """The interaction of the ranked orders' top k, removed together."""
    inter = setting.dropna(subset=["interaction_logit_diff"])
    inter = inter[(inter["mode"] == "remove") & ~inter["order"].str.startswith("random")]
    if inter.empty:
        return []
    lines = [
        "",
        "Interaction of the top k (joint change of the correct-label logit difference, "
        "perturbed - baseline, minus the sum of the same heads' single changes; negative: "
        "they back each other up, positive: they overlap):",
        "",
    ]
    for _, r in inter.sort_values(["order", "k"]).iterrows():
        interval = ci(
            r,
            "interaction_logit_diff",
            "ci_low_interaction_logit_diff",
            "ci_high_interaction_logit_diff",
        )
        lines.append(
            f"- {r['order']}, k = {int(r['k'])}: joint {r['joint_change_logit_diff']:+.3f}, sum "
            f"of singles {r['singles_change_logit_diff']:+.3f}, interaction {interval}"
        )
    return lines


def repair(frame: pd.DataFrame, top: int) -> list[str]:
    """Direct against total effects, per kind, and the heads with the most self-repair."""
    from headperturb.analysis.repair import repair_summary

    lines = [
        "## Direct effects and self-repair (final position)",
        "",
        "Direct effect: what the head's own write does to the correct-label logit difference "
        "at the unembedding, every later layer left out and the norms' scales frozen "
        "(baseline - ablated; > 0: the head helps). Total effect: its exact final-position "
        "ablation. Self-repair = direct - total: what the layers above take back.",
    ]
    summary = repair_summary(frame)
    for kind, s in summary.items():
        heads = frame[(frame["kind"] == kind)].dropna(subset=["total_effect"])
        lines += [
            "",
            f"**{kind_label(kind)}**: {s['heads']} heads measured both ways; Pearson r(direct, "
            f"total) {s['pearson']:.2f}; summed over heads, direct {s['sum_direct']:+.3f} against "
            f"total {s['sum_total']:+.3f}, absolute direct {s['sum_abs_direct']:.3f} against "
            f"absolute total {s['sum_abs_total']:.3f}; {s['repaired']} heads repaired and "
            f"{s['amplified']} amplified (self-repair interval excluding 0).",
            "",
            *table_head("head", "direct effect", "total effect", "self-repair"),
        ]
        lines += _repair_rows(heads, top)
    if not summary:
        lines += [
            "",
            "No head was measured at the final position with a kind of `direct_effects.kinds`: "
            "direct effects only (direct_effects.parquet).",
        ]
    return lines


def _repair_rows(heads: pd.DataFrame, top: int) -> list[str]:
    """The ``top`` heads with the most self-repair (either way)."""
    shown = heads.reindex(heads["self_repair"].abs().sort_values(ascending=False).index).head(top)
    return [
        table_row(
            f"L{int(r['layer'])}H{int(r['head'])}",
            ci(r, "direct_effect", "ci_low_direct_effect", "ci_high_direct_effect"),
            ci(r, "total_effect", "ci_low_total_effect", "ci_high_total_effect"),
            ci(r, "self_repair", "ci_low_self_repair", "ci_high_self_repair"),
        )
        for _, r in shown.iterrows()
    ]
