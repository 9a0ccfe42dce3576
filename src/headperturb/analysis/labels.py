"""How tables, figures and the summary name a run's settings: one place, so the summary and the
figures say the same (and neither imports the other)."""

from __future__ import annotations

from headperturb.core.kinds import build, kinds
from headperturb.core.spec import position_label

SETTING = ["site", "position", "kind", "scale"]
"""The columns that make one setting of a run: one panel or row of panels in every figure, one
section of the summary."""


def setting_label(site: str, position: str, kind: str, scale: str, noise_mode: str = "") -> str:
    """``noise sigma 2, all positions, site o_proj_input``."""
    what = build(kind, scale or None, noise_mode or "absolute").label()
    return f"{what}, {position_label(position)}, site {site}"


def settings(table) -> list[tuple]:
    """The settings of a run (:data:`SETTING` plus the noise mode), in table order."""
    order = {k: i for i, k in enumerate(kinds())}
    combos = table[[*SETTING, "noise_mode"]].drop_duplicates()
    combos = combos.assign(
        _k=combos["kind"].map(order), _s=combos["scale"].map(lambda s: float(s) if s else -1.0)
    ).sort_values(["site", "position", "_k", "_s"])
    return list(combos[[*SETTING, "noise_mode"]].itertuples(index=False, name=None))


def rows_of(table, combo):
    """The rows of ``table`` in one setting (``combo``: values of :data:`SETTING`)."""
    import numpy as np

    rows = np.ones(len(table), dtype=bool)
    for column, value in zip(SETTING, combo):
        rows &= (table[column] == value).to_numpy()
    return table[rows]
