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

from headperturb.analysis.scoring import METRICS

CATEGORIES = ("HIGH", "MEDIUM", "LOW")
KEYS = ["site", "position", "kind", "scale", "layer", "head"]
"""The columns that name a row of the run's table: one perturbed head and setting."""


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


def aggregate(perturbed: pd.DataFrame, high: float = 10.0, medium: float = 5.0) -> pd.DataFrame:
    """The run's table: a row per job (:data:`KEYS`), sorted.

    ``perturbed`` holds one row per job with, for every metric of
    :data:`headperturb.analysis.scoring.METRICS`, ``baseline_<metric>`` (the unperturbed model on the row's
    prompts) and ``contribution_<metric>``; this adds the relative change (in percent of the
    baseline), the direction and the impact category (on the relative change of accuracy).
    """
    table = perturbed.sort_values(KEYS, key=_scale_sort_key, ignore_index=True).copy()
    for metric in METRICS:
        base, score = table[f"baseline_{metric}"], table[f"contribution_{metric}"]
        with np.errstate(invalid="ignore", divide="ignore"):
            table[f"relative_change_{metric}"] = np.where(base != 0, 100.0 * score / base, np.nan)
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

    Under the null each paired difference is as likely to have either sign. Exact when the
    differences are whole multiples of one step (changes of correctness: multiples of 1/draws;
    :func:`lattice_pvalue`) or when 2**n <= n_perm (all sign patterns), else Monte Carlo with the
    observed pattern counted (p = (1 + hits) / (1 + n_perm)), whose floor 1/(1 + n_perm) would
    keep a strong effect from surviving a correction over many rows.
    """
    d = np.asarray(differences, dtype=float)
    d = d[d != 0]  # zero differences carry no sign information
    n = len(d)
    if n == 0:
        return 1.0
    exact = lattice_pvalue(d)
    if exact is not None:
        return exact
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


def lattice_pvalue(differences, max_steps: int = 100, max_work: float = 2e8) -> float | None:
    """The exact two-sided sign-flip p-value of nonzero ``differences`` that are whole multiples
    ``k_i / m`` of one step (``m <= max_steps``), from the distribution of ``sum s_i k_i`` over
    all sign patterns (a convolution, for any n); None when they are not on such a lattice, or
    when the convolution would take more than about ``max_work`` operations (the caller then
    samples sign patterns)."""
    d = np.asarray(differences, dtype=float)
    d = d[d != 0]
    for m in range(1, max_steps + 1):
        k = np.rint(d * m)
        if np.allclose(d * m, k, rtol=0, atol=1e-9):
            break
    else:
        return None
    if not len(k):
        return 1.0
    k = k.astype(np.int64)
    k //= np.gcd.reduce(np.abs(k))  # the same distribution on the coarsest lattice
    steps = np.sort(np.abs(k))
    total = int(steps.sum())
    if total * len(steps) > max_work:  # about n x total operations: Monte Carlo beyond this
        return None
    dist = np.ones(1)  # dist[reach + s]: the probability of the sum s, |s| <= reach
    for step in steps:  # smallest first: the support grows as slowly as it can
        grown = np.zeros(len(dist) + 2 * step)
        grown[: len(dist)] += 0.5 * dist
        grown[2 * step :] += 0.5 * dist
        dist = grown
    sums = np.abs(np.arange(-total, total + 1))
    return float(min(1.0, dist[sums >= abs(int(k.sum()))].sum()))


def correct_logit_diff(labels, margins) -> np.ndarray:
    """The correct label's logit minus the other's: the margin for positives, minus it otherwise."""
    labels = np.asarray(labels)
    return np.where(labels == 1, margins, -np.asarray(margins))


def correct_probability(labels, margins) -> np.ndarray:
    """Probability of the correct label when the two verbalizers are the only choices."""
    return 1.0 / (1.0 + np.exp(-correct_logit_diff(labels, margins)))


def paired_summary(
    labels,
    base: tuple,
    perturbed: tuple,
    *,
    n_boot: int = 2000,
    n_perm: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
    patching: tuple | None = None,
) -> dict[str, float]:
    """Changes (reference - perturbed) with bootstrap intervals and paired permutation p-values,
    and what the change did to the margins (:mod:`headperturb.analysis.effects`).

    ``base`` is (predictions, calibrated margins) of the reference, (n_prompts,) each; ``perturbed``
    the same with (n_prompts, n_draws) each. The point estimates are means over draws. Intervals:
    percentile bootstrap resampling prompts and draws together (paired: the reference is scored
    on the same resampled prompts). p-values: sign-flip tests on the per-prompt differences
    (correctness for accuracy, correct-label logit difference, each prompt's share of the AUC
    change). ``patching`` = (clean margins, partner margins, restore) of a patching kind adds the
    normalised patch effect.

    Keys: ``change_<m>``, ``ci_low_<m>``, ``ci_high_<m>`` for every task metric, ``logit_diff``,
    ``probability``, ``auc`` and the two parts of the accuracy change (``accuracy_bias``: what the
    row's own mean margin shift explains, ``accuracy_discrimination``: the rest); ``auc`` and
    ``reference_auc``; ``bias_shift`` (perturbed - reference, mean margin) with its interval;
    ``p_value``, ``p_value_logit_diff``, ``p_value_auc``, ``p_value_bias`` (the per-prompt change
    of correctness that the shift alone makes), ``detectable_change``; and
    ``patch_effect`` with its interval when ``patching`` is given.
    """
    from headperturb.analysis import effects

    (base_pred, base_margin), (pert_pred, pert_margin) = base, perturbed
    labels = np.asarray(labels)
    base_pred = np.asarray(base_pred)
    base_margin = np.asarray(base_margin, dtype=float)
    pert_pred = np.asarray(pert_pred).reshape(len(labels), -1)
    pert_margin = np.asarray(pert_margin, dtype=float).reshape(len(labels), -1)
    n, draws = pert_pred.shape
    base_c = (base_pred == labels).astype(float)
    pert_c = (pert_pred == labels[:, None]).astype(float)
    base_ld = correct_logit_diff(labels, base_margin)
    pert_ld = correct_logit_diff(labels[:, None], pert_margin)
    base_p = correct_probability(labels, base_margin)
    pert_p = correct_probability(labels[:, None], pert_margin)

    rng = np.random.default_rng(seed)
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float)  # prompt weights
    dw = rng.multinomial(draws, np.full(draws, 1.0 / draws), size=n_boot).astype(float) / draws
    ones, one_draw = np.ones((1, n)), np.ones((1, draws)) / draws
    point, boot = {}, {}
    for name, metric in METRICS.items():
        per_draw = np.stack(
            [metric.compute(ones, labels, pert_pred[:, d])[0] for d in range(draws)]
        )
        point[name] = metric.compute(ones, labels, base_pred)[0] - per_draw.mean()
        draws_b = np.stack([metric.compute(w, labels, pert_pred[:, d]) for d in range(draws)], 1)
        boot[name] = metric.compute(w, labels, base_pred) - (draws_b * dw).sum(axis=1)
    point["logit_diff"] = base_ld.mean() - pert_ld.mean()
    point["probability"] = base_p.mean() - pert_p.mean()
    boot["logit_diff"] = (w @ base_ld - np.einsum("bn,nd,bd->b", w, pert_ld, dw)) / n
    boot["probability"] = (w @ base_p - np.einsum("bn,nd,bd->b", w, pert_p, dw)) / n

    pos, neg = labels == 1, labels == 0
    ref_pairs = effects.auc_pairs(base_margin[pos], base_margin[neg])
    pert_pairs = [effects.auc_pairs(pert_margin[pos, d], pert_margin[neg, d]) for d in range(draws)]
    aucs = (
        np.array([p.mean() for p in pert_pairs])
        if pos.any() and neg.any()
        else np.full(draws, np.nan)
    )
    ref_auc = float(ref_pairs.mean()) if pos.any() and neg.any() else float("nan")
    point["auc"] = ref_auc - aucs.mean()
    boot_pert = np.stack([effects.weighted_auc(p, w[:, pos], w[:, neg]) for p in pert_pairs], 1)
    boot["auc"] = effects.weighted_auc(ref_pairs, w[:, pos], w[:, neg]) - (boot_pert * dw).sum(1)

    shift = effects.bias_shift(base_margin, pert_margin, ones, one_draw)
    shift_b = effects.bias_shift(base_margin, pert_margin, w, dw)
    shifted = effects.shift_only_accuracy(labels, base_margin, shift, ones)[0]
    shifted_c = ((base_margin + shift[0] > 0).astype(int) == labels).astype(float)
    point["accuracy_bias"] = base_c.mean() - shifted
    boot["accuracy_bias"] = w @ base_c / n - effects.shift_only_accuracy(
        labels, base_margin, shift_b, w
    )
    point["accuracy_discrimination"] = point["accuracy"] - point["accuracy_bias"]
    boot["accuracy_discrimination"] = boot["accuracy"] - boot["accuracy_bias"]

    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out: dict[str, float] = {}
    for metric, value in point.items():
        out[f"change_{metric}"] = float(value)
        out[f"ci_low_{metric}"] = float(np.nanpercentile(boot[metric], lo))
        out[f"ci_high_{metric}"] = float(np.nanpercentile(boot[metric], hi))
    out["reference_auc"], out["auc"] = ref_auc, float(aucs.mean())
    out["bias_shift"] = float(shift[0])
    out["ci_low_bias_shift"], out["ci_high_bias_shift"] = np.percentile(shift_b, [lo, hi]).tolist()
    out["p_value"] = sign_flip_pvalue(base_c - pert_c.mean(axis=1), n_perm, seed)
    out["detectable_change"] = detectable_change(base_c - pert_c.mean(axis=1))
    out["p_value_logit_diff"] = sign_flip_pvalue(base_ld - pert_ld.mean(axis=1), n_perm, seed)
    out["p_value_bias"] = sign_flip_pvalue(base_c - shifted_c, n_perm, seed)  # exact: 0, +-1
    out["p_value_auc"] = (
        sign_flip_pvalue(effects.auc_flip_values(labels, base_margin, pert_margin), n_perm, seed)
        if pos.any() and neg.any()
        else float("nan")
    )
    if patching is not None:
        clean, partner, restore = patching
        args = (labels, clean, partner, pert_margin[:, 0])
        out["patch_effect"] = float(effects.patch_effect(*args, ones, restore)[0])
        boot_effect = effects.patch_effect(*args, w, restore)
        out["ci_low_patch_effect"], out["ci_high_patch_effect"] = np.nanpercentile(
            boot_effect, [lo, hi]
        ).tolist()
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


def category_span(low: float, high_end: float, high: float, medium: float) -> list[str]:
    """The impact categories that a relative change anywhere in [low, high_end] (in %) would get,
    from LOW to HIGH."""
    if np.isnan(low) or np.isnan(high_end):
        return []
    smallest = 0.0 if low <= 0 <= high_end else min(abs(low), abs(high_end))
    largest = max(abs(low), abs(high_end))
    order = ["LOW", "MEDIUM", "HIGH"]
    first = order.index(impact_category(smallest, high, medium))
    last = order.index(impact_category(largest, high, medium))
    return order[first : last + 1]


def detectable_change(differences, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest mean paired difference a two-sided test at ``alpha`` detects with ``power``,
    from the spread of the per-prompt ``differences`` (normal approximation): (z_{1-alpha/2} +
    z_power) * sd / sqrt(n)."""
    from statistics import NormalDist

    d = np.asarray(differences, dtype=float)
    if len(d) < 2:
        return float("nan")
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return float(z * d.std(ddof=1) / np.sqrt(len(d)))
