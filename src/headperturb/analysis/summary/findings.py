"""What the heads change, read apart: the ranking of the reviews (discrimination, the ROC AUC of
the margin), the answer when the head's output comes from the opposite review (patching), and
the margins all moved one way (bias)."""

from __future__ import annotations

import pandas as pd

from headperturb.analysis.labels import rows_of, setting_label
from headperturb.analysis.labels import settings as run_settings
from headperturb.analysis.summary.common import ci, head_name, setting_of, table_head, table_row


def findings(table: pd.DataFrame, meta: dict, pairs, top: int) -> list[str]:
    """The section: how the effects are told apart, then discrimination, patching and bias."""
    alpha = meta.get("alpha", 0.05)
    base_auc = meta.get("baseline", {}).get("auc", float("nan"))
    lines = [
        "## What the heads change",
        "",
        "A head can change how well the margins rank positive above negative reviews "
        f"(discrimination: the ROC AUC of the margin, {base_auc:.3f} unperturbed, "
        "threshold-free), or move every margin the same way (bias: the mean margin shift; the "
        "threshold fitted on the unperturbed model then calls more reviews one class). "
        "`effect` in the table says which, by its 95% intervals and q-values: discrimination "
        f"when the AUC change's interval excludes 0 and its q < {alpha:g}, bias when the "
        "interval of the accuracy change that the mean shift alone explains excludes 0 and "
        f"its q < {alpha:g}.",
        "",
    ]
    lines += _discrimination(table, top)
    patched = table[table["kind"].isin(["patch", "restore"])]
    if not patched.empty:
        lines += ["", "### Patching from the opposite review", ""]
        lines += _pairs(pairs) if pairs is not None else []
        lines += _patch_lines(patched, top)
    return lines + _bias(table, top)


def _discrimination(table: pd.DataFrame, top: int) -> list[str]:
    disc = table[table["effect"].isin(["discrimination", "both"])]
    lines = [f"### Discrimination ({len(disc)} of {len(table)} rows)", ""]
    largest = table.loc[table["change_auc"].abs().idxmax()] if len(table) else None
    if disc.empty and largest is not None:
        lines.append(
            f"No single perturbation changes discrimination: the largest AUC change is "
            f"{ci(largest, 'change_auc', 'ci_low_auc', 'ci_high_auc')} ({head_name(largest)}, "
            f"{setting_of(largest)}, q {largest['q_value_auc']:.3g})."
        )
    elif not disc.empty:
        lines += _auc_lines(disc.sort_values("change_auc", key=abs, ascending=False).head(top))
    return lines


def _auc_lines(rows: pd.DataFrame) -> list[str]:
    lines = table_head(
        *("layer", "head", "setting", "AUC change [95% CI]", "q", "accuracy change"),
        *("bias shift", "effect"),
    )
    for _, r in rows.iterrows():
        lines.append(
            table_row(
                r["layer"],
                r["head"],
                setting_of(r),
                ci(r, "change_auc", "ci_low_auc", "ci_high_auc"),
                f"{r['q_value_auc']:.3g}",
                f"{r['contribution_accuracy']:+.3f}",
                f"{r['bias_shift']:+.2f}",
                r["effect"],
            )
        )
    return lines


def _pairs(pairs: pd.DataFrame) -> list[str]:
    """How many prompts have a partner to patch from, and what the patch effect measures."""
    found = int((pairs["partner_id"] >= 0).sum())
    return [
        f"{found} of {len(pairs)} test prompts have an opposite-sentiment partner "
        "of the same length (same demonstrations, a test review of the other label); "
        f"the other {len(pairs) - found} take no part in patching. Patch effect: the "
        "share of the clean-partner difference in the label-signed margin that "
        "patching the head moves (0: none, 1: all; ratio of means over the paired "
        "prompts).",
        "",
    ]


def _patch_lines(patched: pd.DataFrame, top: int) -> list[str]:
    lines = []
    for combo in run_settings(patched):
        rows = rows_of(patched, combo)
        rows = rows.sort_values("patch_effect", key=abs, ascending=False)
        lines += [f"{setting_label(*combo)}, {len(rows)} heads; largest patch effects:", ""]
        lines += table_head(
            *("layer", "head", "patch effect [95% CI]", "q (logit difference)", "AUC change"),
            "accuracy change",
        )
        for _, r in rows.head(top).iterrows():
            lines.append(
                table_row(
                    r["layer"],
                    r["head"],
                    ci(r, "patch_effect", "ci_low_patch_effect", "ci_high_patch_effect"),
                    f"{r['q_value_logit_diff']:.3g}",
                    f"{r['change_auc']:+.3f}",
                    f"{r['contribution_accuracy']:+.3f}",
                )
            )
        lines.append("")
    return lines


def _bias(table: pd.DataFrame, top: int) -> list[str]:
    bias = table[table["effect"].isin(["bias", "both"])]
    lines = ["", f"### Bias ({len(bias)} of {len(table)} rows)", ""]
    if bias.empty:
        lines.append("No perturbation shifts the margins enough to change the accuracy by itself.")
        return lines
    lines += table_head(
        *("layer", "head", "setting", "bias shift [95% CI]", "accuracy change"),
        *("of which the shift explains", "effect"),
    )
    for _, r in bias.sort_values("bias_shift", key=abs, ascending=False).head(top).iterrows():
        explained = ci(
            r, "contribution_accuracy_bias", "ci_low_accuracy_bias", "ci_high_accuracy_bias"
        )
        lines.append(
            table_row(
                r["layer"],
                r["head"],
                setting_of(r),
                ci(r, "bias_shift", "ci_low_bias_shift", "ci_high_bias_shift", 2),
                f"{r['contribution_accuracy']:+.3f}",
                explained,
                r["effect"],
            )
        )
    return lines
