"""Where in the prompt the mapped heads act (:mod:`headperturb.analysis.segments`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from headperturb.analysis.summary.common import table_head, table_row
from headperturb.core.spec import position_label

WHERE = {
    "demonstrations": "the demonstrations",
    "review": "the review",
    "last": "the final position",
}
"""How the section names each segment of the prompt."""


def segments(table: pd.DataFrame, alpha: float, top: int) -> list[str]:
    """The section, when the run measured heads at two segments of the prompt or more."""
    from headperturb.analysis.segments import counts, segment_map

    frame = segment_map(table, alpha)
    if frame.empty:
        return []
    lines = [
        "## Where in the prompt",
        "",
        "Heads perturbed at one segment of the prompt at a time: the demonstrations (the shared "
        "examples and their separators), the review (the test review's template words and text) "
        "and the last position (where the label is read). Change of the correct-label logit "
        "difference, baseline - perturbed (> 0: the head's output there helps), with its 95% "
        f"interval; a segment counts as where the head acts when its q < {alpha:g}. At the last "
        "layer only the final position reaches the logits, and patching the demonstrations "
        "changes nothing (the partner prompt shares them): those jobs take the unperturbed "
        "logits, and their changes are exactly 0.",
    ]
    counted = counts(frame)
    for (site, kind, scale), group in frame.groupby(["site", "kind", "scale"], sort=False):
        n = counted[
            (counted["site"] == site) & (counted["kind"] == kind) & (counted["scale"] == scale)
        ].iloc[0]
        lines += _setting(group, n, top)
    return lines


def _setting(group: pd.DataFrame, n: pd.Series, top: int) -> list[str]:
    """One setting's mapped heads: how many act at each segment (``n``: its counts), and its
    ``top`` heads' changes at every position and segment."""
    from headperturb.analysis.segments import setting_name, shown

    acting = "; ".join(
        f"at {WHERE[s]}: {n[s]}" + (f" ({_acting_heads(group, s)})" if n[s] else "") for s in WHERE
    )
    lines = [
        "",
        f"### {setting_name(group.iloc[0])} ({n['heads']} heads)",
        "",
        f"Heads that act {acting}; nowhere: {n['none']}.",
        "",
        *table_head(
            "layer",
            "head",
            *(position_label(p) for p in shown(group)),
            "sum of segments",
            "acts at",
        ),
    ]
    for _, r in group.head(top).iterrows():
        cells = [
            "-"
            if np.isnan(r[f"ld_{p}"])
            else f"{r[f'ld_{p}']:+.3f} [{r[f'low_{p}']:+.3f}, {r[f'high_{p}']:+.3f}]"
            for p in shown(group)
        ]
        total = "-" if np.isnan(r["segments_sum"]) else f"{r['segments_sum']:+.3f}"
        lines.append(table_row(r["layer"], r["head"], *cells, total, r["acts_at"]))
    return lines


def _acting_heads(group: pd.DataFrame, segment: str) -> str:
    """The first eight heads of the setting that act at ``segment``."""
    found = group[group["acts_at"].str.split(", ").map(lambda a: segment in a)]
    names = [f"L{r.layer}H{r.head}" for r in found.head(8).itertuples()]
    return ", ".join(names) + (", ..." if len(found) > 8 else "")
