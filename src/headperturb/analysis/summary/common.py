"""What the summary's sections share: Markdown tables, the names of settings, kinds and heads,
and a value with its interval."""

from __future__ import annotations

import pandas as pd

from headperturb.analysis.labels import setting_label


def setting_of(row) -> str:
    """The name of a table row's setting."""
    return setting_label(
        row["site"], row["position"], row["kind"], row["scale"], row.get("noise_mode", "")
    )


def kind_label(kind: str) -> str:
    """How tables name a kind without a scale: ``zero ablation``, ``patch from the opposite
    review``."""
    from headperturb.core.kinds import build

    return build(kind).label()


def ci(row, value: str, low: str, high: str, digits: int = 3) -> str:
    """``row[value]`` with its interval ``[row[low], row[high]]``, signed."""
    return f"{row[value]:+.{digits}f} [{row[low]:+.{digits}f}, {row[high]:+.{digits}f}]"


def head_name(row) -> str:
    return f"L{int(row['layer'])}H{int(row['head'])}"


def table_head(*columns: str) -> list[str]:
    """A Markdown table's header and its rule."""
    return ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]


def table_row(*cells) -> str:
    """A Markdown table's row, each cell as an f-string shows it."""
    return "| " + " | ".join(f"{cell}" for cell in cells) + " |"


def head_lines(rows: pd.DataFrame) -> list[str]:
    """A Markdown table of heads: where, what, contribution with its interval, certainty."""
    lines = table_head(
        *("layer", "head", "setting", "contribution (accuracy) [95% CI]", "q", "significant"),
        *("impact", "conclusive", "AUC change", "bias shift", "effect"),
    )
    for _, r in rows.iterrows():
        lines.append(
            table_row(
                r["layer"],
                r["head"],
                setting_of(r),
                ci(r, "contribution_accuracy", "ci_low", "ci_high"),
                f"{r['q_value']:.3g}",
                "yes" if r["significant"] else "no",
                r["impact"],
                "yes" if r["conclusive"] else "no, " + r["categories_spanned"],
                f"{r['change_auc']:+.3f}",
                f"{r['bias_shift']:+.2f}",
                r["effect"],
            )
        )
    return lines
