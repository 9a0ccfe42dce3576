"""Where in the prompt a head acts: its measured effect at each segment of the prompt.

A prompt is the shared demonstrations, the test review (its template words and text) and the
final position, where the label is read (:data:`headperturb.core.spec.SEGMENTS`). Perturbing a
head at one segment only says what its output there contributes: at the demonstrations, what it
writes while the examples are read (and later positions read back); at the review, what it
writes while the review is read; at the final position, what it writes where the answer is
formed. :func:`segment_map` puts a head's measurements at the segments side by side.

The measure is the change in the correct-label logit difference (baseline - perturbed, so > 0:
the head's output there helps), threshold-free and paired over prompts; a segment counts as
where the head acts when that change's q-value is below alpha.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from headperturb.core.spec import SEGMENTS, demonstration_index, within_demonstrations

HEAD = ["site", "kind", "scale", "layer", "head"]
"""A head in one setting apart from its positions."""

SHOWN = ("all", *SEGMENTS)
"""The columns of every map: every position, then the segments in prompt order; the positions
inside the demonstrations a run measured follow (:func:`inside`)."""


def inside(positions) -> tuple[str, ...]:
    """The positions inside the demonstrations among ``positions``: ``label_words``, then
    ``demonstration_<i>`` by ``i``."""
    found = {str(p) for p in positions if within_demonstrations(str(p))}
    return tuple(sorted(found, key=lambda p: demonstration_index(p) or 0))


def shown(frame: pd.DataFrame) -> tuple[str, ...]:
    """The positions a map (:func:`segment_map`) has columns for, in order."""
    return tuple(c[len("ld_") :] for c in frame.columns if c.startswith("ld_"))


MEASURES = {
    "ld": "change_logit_diff",
    "low": "ci_low_logit_diff",
    "high": "ci_high_logit_diff",
    "q": "q_value_logit_diff",
    "auc": "change_auc",
}
"""Per position of the map, its columns ``<prefix>_<position>``: prefix -> the run table's
column it comes from."""


def segment_map(table: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """One row per head and setting measured at two segments or more: for each position in
    :data:`SHOWN` and those inside the demonstrations the table holds (:func:`inside`) the change
    of the logit difference (``ld_<position>``, NaN where not measured), its interval (``low_``,
    ``high_``), q-value (``q_``) and AUC change (``auc_``); ``acts_at``, the segments and
    positions inside the demonstrations whose change has q < alpha, largest first,
    comma-separated ("none" where there is none); ``segments_sum``, the sum of the segments'
    changes (to set beside ``ld_all``: close when the segments' effects add up); ``largest``,
    the largest absolute change over the segments. Sorted by ``largest``, largest first."""
    columns_at = SHOWN + inside(table["position"].unique())
    part = table[table["position"].isin(columns_at)]
    rows = []
    for key, group in part.groupby(HEAD, sort=False):
        by = group.set_index("position")
        if len(by.index.intersection(SEGMENTS)) < 2:
            continue
        row = dict(zip(HEAD, key))
        row["noise_mode"] = str(group["noise_mode"].iloc[0]) if "noise_mode" in group else ""
        for position in columns_at:
            found = position in by.index
            for out, column in MEASURES.items():
                row[f"{out}_{position}"] = float(by.at[position, column]) if found else np.nan
        changes = {s: row[f"ld_{s}"] for s in SEGMENTS if not np.isnan(row[f"ld_{s}"])}
        if not changes:
            continue
        acting = [s for s in changes if row[f"q_{s}"] < alpha]
        acting += [p for p in inside(by.index) if row[f"q_{p}"] < alpha]
        changes_in = {p: row[f"ld_{p}"] for p in acting}
        acting.sort(key=lambda s: -abs(changes_in[s]))
        row["acts_at"] = ", ".join(acting) or "none"
        row["segments_sum"] = (
            float(sum(changes.values())) if len(changes) == len(SEGMENTS) else np.nan
        )
        row["largest"] = float(max(abs(v) for v in changes.values()))
        rows.append(row)
    measured = [f"{o}_{p}" for p in columns_at for o in MEASURES]
    columns = [*HEAD, "noise_mode", *measured, "acts_at", "segments_sum", "largest"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.sort_values("largest", ascending=False, kind="stable").reset_index(drop=True)


def setting_name(row) -> str:
    """``zero ablation, site o_proj_input``: a setting of the map, its positions apart."""
    from headperturb.core.kinds import build

    what = build(row["kind"], row["scale"] or None, row["noise_mode"] or "absolute").label()
    return f"{what}, site {row['site']}"


def counts(frame: pd.DataFrame) -> pd.DataFrame:
    """Per setting (site, kind, scale): how many heads were mapped and how many act at each
    segment (a head may act at several)."""
    out = []
    for key, group in frame.groupby(["site", "kind", "scale"], sort=False):
        acting = group["acts_at"].str.split(", ")
        row = dict(zip(["site", "kind", "scale"], key), heads=len(group))
        for s in SEGMENTS:
            row[s] = int(acting.map(lambda found, s=s: s in found).sum())
        row["none"] = int((group["acts_at"] == "none").sum())
        out.append(row)
    return pd.DataFrame(out, columns=["site", "kind", "scale", "heads", *SEGMENTS, "none"])
