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
KEYS = ["site", "kind", "layer", "head", "scale"]


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
    return pd.to_numeric(column, errors="coerce").fillna(-1) if column.name == "scale" else column


def category_counts(table: pd.DataFrame) -> dict[str, int]:
    counts = table["impact"].value_counts()
    return {c: int(counts.get(c, 0)) for c in CATEGORIES}


# -- uncertainty ----------------------------------------------------------------------------------


def bh_qvalues(p_values) -> np.ndarray:
    """Benjamini-Hochberg q-values (step-up, monotone, capped at 1); NaN p-values stay NaN."""
    p = np.asarray(p_values, dtype=float)
    q = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return q
    order = np.argsort(p[ok])
    ranked = p[ok][order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(ranked, 1.0)
    q[ok] = out
    return q


def sign_flip_pvalue(differences, n_perm: int = 10_000, seed: int = 0) -> float:
    """Two-sided paired permutation test that the mean of ``differences`` is 0.

    Under the null each paired difference is as likely to have either sign. Exact (all sign
    patterns) when 2**n <= n_perm, else Monte Carlo with the observed pattern counted
    (p = (1 + hits) / (1 + n_perm)).
    """
    d = np.asarray(differences, dtype=float)
    d = d[d != 0]  # zero differences carry no sign information
    n = len(d)
    if n == 0:
        return 1.0
    observed = abs(d.mean())
    tol = 1e-12 * max(1.0, observed)
    if 2**n <= n_perm:
        signs = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) * 2 - 1
        return float((np.abs(signs @ d / n) >= observed - tol).mean())
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_perm, 2000):
        signs = rng.choice(np.array([-1.0, 1.0]), size=(min(2000, n_perm - start), n))
        hits += int((np.abs(signs @ d / n) >= observed - tol).sum())
    return (1 + hits) / (1 + n_perm)


def _macro_f1_from_weights(
    weights: np.ndarray, labels: np.ndarray, preds: np.ndarray
) -> np.ndarray:
    """Macro-F1 for every row of prompt ``weights`` (B, n) against one prediction vector (n,)."""
    pos, lab = preds == 1, labels == 1
    tp1 = weights @ (pos & lab)
    fp1 = weights @ (pos & ~lab)
    fn1 = weights @ (~pos & lab)
    tp0 = weights @ (~pos & ~lab)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1_1 = np.where(2 * tp1 + fp1 + fn1 > 0, 2 * tp1 / (2 * tp1 + fp1 + fn1), 0.0)
        f1_0 = np.where(2 * tp0 + fn1 + fp1 > 0, 2 * tp0 / (2 * tp0 + fn1 + fp1), 0.0)
    return (f1_0 + f1_1) / 2


def correct_logit_diff(labels, margins) -> np.ndarray:
    """The correct label's logit minus the other's: the margin for positives, minus it otherwise."""
    labels = np.asarray(labels)
    return np.where(labels == 1, margins, -np.asarray(margins))


def correct_probability(labels, margins) -> np.ndarray:
    """Probability of the correct label when the two verbalizers are the only choices."""
    return 1.0 / (1.0 + np.exp(-correct_logit_diff(labels, margins)))


def paired_summary(
    labels,
    base_pred,
    base_margin,
    pert_pred,
    pert_margin,
    *,
    n_boot: int = 2000,
    n_perm: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Changes (baseline - perturbed) with bootstrap intervals and paired permutation p-values.

    ``pert_pred`` and ``pert_margin`` are (n_prompts, n_draws). The point estimates are means
    over draws. Intervals: percentile bootstrap resampling prompts and draws together (paired:
    the baseline is scored on the same resampled prompts). p-values: sign-flip test on the
    per-prompt differences (correctness for accuracy, correct-label logit difference).
    """
    labels = np.asarray(labels)
    base_pred = np.asarray(base_pred)
    pert_pred = np.asarray(pert_pred).reshape(len(labels), -1)
    pert_margin = np.asarray(pert_margin, dtype=float).reshape(len(labels), -1)
    n, draws = pert_pred.shape
    base_c = (base_pred == labels).astype(float)
    pert_c = (pert_pred == labels[:, None]).astype(float)
    base_ld = correct_logit_diff(labels, base_margin)
    pert_ld = correct_logit_diff(labels[:, None], pert_margin)
    base_p = correct_probability(labels, base_margin)
    pert_p = correct_probability(labels[:, None], pert_margin)

    ones = np.ones((1, n))
    f1_base = _macro_f1_from_weights(ones, labels, base_pred)[0]
    f1_draws = np.array(
        [_macro_f1_from_weights(ones, labels, pert_pred[:, d])[0] for d in range(draws)]
    )
    point = {
        "accuracy": base_c.mean() - pert_c.mean(),
        "f1": f1_base - f1_draws.mean(),
        "logit_diff": base_ld.mean() - pert_ld.mean(),
        "probability": base_p.mean() - pert_p.mean(),
    }

    rng = np.random.default_rng(seed)
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float)  # prompt weights
    dw = rng.multinomial(draws, np.full(draws, 1.0 / draws), size=n_boot).astype(float) / draws
    boot = {
        "accuracy": (w @ base_c - np.einsum("bn,nd,bd->b", w, pert_c, dw)) / n,
        "logit_diff": (w @ base_ld - np.einsum("bn,nd,bd->b", w, pert_ld, dw)) / n,
        "probability": (w @ base_p - np.einsum("bn,nd,bd->b", w, pert_p, dw)) / n,
    }
    f1_b = np.stack(
        [_macro_f1_from_weights(w, labels, pert_pred[:, d]) for d in range(draws)], axis=1
    )
    boot["f1"] = _macro_f1_from_weights(w, labels, base_pred) - (f1_b * dw).sum(axis=1)

    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out: dict[str, float] = {}
    for metric, value in point.items():
        out[f"change_{metric}"] = float(value)
        out[f"ci_low_{metric}"] = float(np.percentile(boot[metric], lo))
        out[f"ci_high_{metric}"] = float(np.percentile(boot[metric], hi))
    out["p_value"] = sign_flip_pvalue(base_c - pert_c.mean(axis=1), n_perm, seed)
    out["p_value_logit_diff"] = sign_flip_pvalue(base_ld - pert_ld.mean(axis=1), n_perm, seed)
    return out


def category_stability(
    relative_halves: list[tuple[float, float]], high: float, medium: float
) -> list:
    """For each head: does its category agree between two disjoint halves of the draws?"""
    return [
        None
        if (np.isnan(a) or np.isnan(b))
        else impact_category(a, high, medium) == impact_category(b, high, medium)
        for a, b in relative_halves
    ]
