"""The screen's section: its largest estimates, and how well they agree with the exact
measurements of the same heads."""

from __future__ import annotations

from headperturb.analysis.summary.common import table_head, table_row
from headperturb.core.spec import position_label


def screen(screened: dict, threshold: float, top: int) -> list[str]:
    """``screened``: the screen's per-head estimates (``heads``), their ``agreement`` with the
    exact measurements and the ``disagreements`` larger than ``threshold``."""
    heads, agree, disagree = screened["heads"], screened["agreement"], screened["disagreements"]
    zero = heads[heads["kind"] == "zero"]
    lines = [
        "## Screen (estimates, not measurements)",
        "",
        f"Every head of every layer ({zero[['layer', 'head']].drop_duplicates().shape[0]} heads) "
        "estimated from one forward and one backward pass per prompt (first-order attribution "
        "patching). The estimates chose what to measure; the table above holds the measurements.",
        "",
        f"Largest estimated zero-ablation effects (contribution to the correct-label logit "
        f"difference), top {top} per positions:",
        "",
        *table_head("positions", "layer", "head", "estimate", "rank"),
    ]
    for _, r in zero[zero["rank"] <= top].iterrows():
        estimate = f"{r['est_logit_diff']:+.4f}"
        lines.append(table_row(r["position"], r["layer"], r["head"], estimate, r["rank"]))
    lines += [
        "",
        "Agreement with the exact measurements of the same heads (correct-label logit "
        "difference; `all` = every layer):",
        "",
    ]
    lines += _agreement(agree)
    lines += [
        "",
        f"Heads whose estimate and measurement differ by more than {threshold:g} in the "
        f"logit difference: {len(disagree)}.",
    ]
    for _, r in disagree.iterrows():
        lines.append(
            f"- {r['kind']} ablation, {position_label(r['position'])}, layer {r['layer']} head "
            f"{r['head']}: estimate {r['est_logit_diff']:+.4f}, exact {r['exact_logit_diff']:+.4f}"
        )
    return lines


def _agreement(agree) -> list[str]:
    if agree.empty:
        return ["No head was measured both ways."]
    lines = table_head(
        *("kind", "positions", "layer", "heads", "Spearman", "Pearson", "signs agree"),
        "largest miss (head)",
    )
    for _, r in agree.iterrows():
        lines.append(
            table_row(
                r["kind"],
                r["position"],
                r["layer"],
                r["heads"],
                f"{r['spearman']:.3f}",
                f"{r['pearson']:.3f}",
                f"{100 * r['sign_agreement']:.0f}%",
                f"{r['largest_miss']:.4f} ({r['largest_miss_head']})",
            )
        )
    return lines
