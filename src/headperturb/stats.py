"""Contribution scores, relative change, direction and impact categories, and the run's table.

- contribution score = baseline - perturbed: positive when the head helps the task (disturbing it
  lowers the metric), negative when it hurts, zero when neutral;
- relative change (%) = 100 * (baseline - perturbed) / baseline;
- impact category on |relative change| of accuracy: HIGH above ``high``, MEDIUM from ``medium`` to
  ``high`` (both ends included), LOW below ``medium``. The defaults are 10 and 5.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

CATEGORIES = ("HIGH", "MEDIUM", "LOW")
DIRECTIONS = ("beneficial", "harmful", "neutral")
KEYS = ["site", "layer", "head", "scale"]


def contribution(baseline: float, perturbed):
    """baseline - perturbed (a scalar or an array, as ``perturbed``)."""
    return np.subtract(baseline, perturbed, dtype=float)


def relative_change(baseline: float, perturbed):
    """100 * (baseline - perturbed) / baseline, in percent of the baseline; NaN when baseline is 0."""
    if baseline == 0:
        return np.full(np.shape(perturbed), np.nan)[()]
    return 100.0 * contribution(baseline, perturbed) / baseline


def direction(score: float) -> str:
    """``beneficial`` for a positive contribution, ``harmful`` for a negative one, else ``neutral``."""
    if score > 0:
        return "beneficial"
    if score < 0:
        return "harmful"
    return "neutral"


def impact_category(relative: float, high: float = 10.0, medium: float = 5.0) -> str:
    """HIGH if |relative| > high, MEDIUM if medium <= |relative| <= high, else LOW.

    ``relative`` is compared after rounding to 9 decimals, so float error at a boundary does not
    move a change of exactly 5% (say 0.80 -> 0.84) into another category.
    """
    if not medium <= high:
        raise ValueError(
            f"thresholds must satisfy medium <= high, got medium={medium}, high={high}"
        )
    # rounded so that a change of exactly 5% computed as 4.9999999999 counts as 5%
    size = round(abs(float(relative)), 9)
    if math.isnan(size):
        return "LOW"
    if size > high:
        return "HIGH"
    if size >= medium:
        return "MEDIUM"
    return "LOW"


def aggregate(
    baseline: dict[str, float], perturbed: pd.DataFrame, high: float = 10.0, medium: float = 5.0
) -> pd.DataFrame:
    """The run's table: a row per (site, layer, head, scale).

    ``baseline`` holds ``accuracy`` and ``f1``; ``perturbed`` holds one row per job with the
    perturbed ``accuracy`` and ``f1`` (mean over draws) and the key columns.
    """
    table = perturbed.sort_values(KEYS, key=_scale_sort_key, ignore_index=True).copy()
    for metric in ("accuracy", "f1"):
        base = float(baseline[metric])
        table[f"baseline_{metric}"] = base
        table[f"contribution_{metric}"] = contribution(base, table[metric].to_numpy())
        table[f"relative_change_{metric}"] = relative_change(base, table[metric].to_numpy())
    table["direction"] = [direction(s) for s in table["contribution_accuracy"]]
    table["impact"] = [impact_category(r, high, medium) for r in table["relative_change_accuracy"]]
    return table


def _scale_sort_key(column: pd.Series) -> pd.Series:
    return column.astype(float) if column.name == "scale" else column


def category_counts(table: pd.DataFrame) -> dict[str, int]:
    counts = table["impact"].value_counts()
    return {c: int(counts.get(c, 0)) for c in CATEGORIES}
