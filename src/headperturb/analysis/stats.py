"""Contribution scores, relative change, direction and impact categories, and the run's table.

- contribution score = baseline - perturbed: positive when the head helps the task (disturbing it
  lowers the metric), negative when it hurts, zero when neutral;
- relative change (%) = 100 * (baseline - perturbed) / baseline;
- impact category on |relative change| of accuracy: HIGH above ``high``, MEDIUM from ``medium`` to
  ``high`` (both ends included), LOW below ``medium``. The defaults are 10 and 5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from headperturb.analysis import effects
from headperturb.analysis.scoring import METRICS

# the tests live in significance; stats.bh_qvalues, stats.lattice_pvalue and the rest still work
from headperturb.analysis.significance import (  # noqa: F401
    bh_qvalues,
    detectable_change,
    lattice_pvalue,
    sign_flip_pvalue,
)

CATEGORIES = ("HIGH", "MEDIUM", "LOW")
KEYS = ["site", "position", "kind", "scale", "layer", "head"]
"""The columns that name a row of the run's table: one perturbed head and setting."""


def contribution(baseline: float, perturbed):
    """baseline - perturbed (a scalar or an array, as ``perturbed``)."""
    return np.subtract(baseline, perturbed, dtype=float)


def relative_change(baseline: float, perturbed):
    """100 * (baseline - perturbed) / baseline, in percent of the baseline; NaN when baseline
    is 0."""
    if baseline == 0:
        return np.full(np.shape(perturbed), np.nan)[()]
    return 100.0 * contribution(baseline, perturbed) / baseline


def direction(score: float) -> str:
    """``beneficial`` for a positive contribution, ``harmful`` for a negative one, else
    ``neutral``."""
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
    :data:`headperturb.analysis.scoring.METRICS`, ``baseline_<metric>`` (the unperturbed model on
    the row's prompts) and ``contribution_<metric>``; this adds the relative change (in percent of
    the baseline), the direction and the impact category (on the relative change of accuracy).
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
    pair = _Pair.of(labels, base, perturbed)
    rng = np.random.default_rng(seed)
    n, draws = pair.pert_pred.shape
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float)  # prompt weights
    dw = rng.multinomial(draws, np.full(draws, 1.0 / draws), size=n_boot).astype(float) / draws
    point, boot = _task_changes(pair, w, dw)
    point["auc"], boot["auc"], reference_auc, auc = _auc_change(pair, w, dw)
    shift, shift_b, shifted_c = _shift(pair, w, dw)
    point["accuracy_bias"], boot["accuracy_bias"] = _shift_accuracy(pair, shift, shift_b, w)
    point["accuracy_discrimination"] = point["accuracy"] - point["accuracy_bias"]
    boot["accuracy_discrimination"] = boot["accuracy"] - boot["accuracy_bias"]

    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out: dict[str, float] = {}
    for metric, value in point.items():
        out[f"change_{metric}"] = float(value)
        out[f"ci_low_{metric}"] = float(np.nanpercentile(boot[metric], lo))
        out[f"ci_high_{metric}"] = float(np.nanpercentile(boot[metric], hi))
    out["reference_auc"], out["auc"] = reference_auc, auc
    out["bias_shift"] = float(shift[0])
    out["ci_low_bias_shift"], out["ci_high_bias_shift"] = np.percentile(shift_b, [lo, hi]).tolist()
    out.update(_tests(pair, shifted_c, n_perm, seed))
    if patching is not None:
        out.update(_patch_effect(pair, patching, w, (lo, hi)))
    return out


@dataclass(frozen=True, eq=False)
class _Pair:
    """A reference and a perturbed run of the same prompts: the labels (n,), the reference's
    predictions and calibrated margins (n,), and the perturbed ones (n, draws)."""

    labels: np.ndarray
    base_pred: np.ndarray
    base_margin: np.ndarray
    pert_pred: np.ndarray
    pert_margin: np.ndarray

    @classmethod
    def of(cls, labels, base: tuple, perturbed: tuple) -> _Pair:
        (base_pred, base_margin), (pert_pred, pert_margin) = base, perturbed
        labels = np.asarray(labels)
        return cls(
            labels=labels,
            base_pred=np.asarray(base_pred),
            base_margin=np.asarray(base_margin, dtype=float),
            pert_pred=np.asarray(pert_pred).reshape(len(labels), -1),
            pert_margin=np.asarray(pert_margin, dtype=float).reshape(len(labels), -1),
        )

    @property
    def base_correct(self) -> np.ndarray:
        return (self.base_pred == self.labels).astype(float)

    @property
    def pert_correct(self) -> np.ndarray:
        return (self.pert_pred == self.labels[:, None]).astype(float)

    @property
    def base_ld(self) -> np.ndarray:
        return correct_logit_diff(self.labels, self.base_margin)

    @property
    def pert_ld(self) -> np.ndarray:
        return correct_logit_diff(self.labels[:, None], self.pert_margin)


def _task_changes(pair: _Pair, w: np.ndarray, dw: np.ndarray) -> tuple[dict, dict]:
    """The change of every task metric, the correct-label logit difference and probability: the
    point estimates (means over draws), and their bootstrap over prompt weights ``w`` (B, n) and
    draw weights ``dw`` (B, draws)."""
    labels, (n, draws) = pair.labels, pair.pert_pred.shape
    ones = np.ones((1, n))
    point, boot = {}, {}
    for name, metric in METRICS.items():
        per_draw = [metric.compute(ones, labels, pair.pert_pred[:, d])[0] for d in range(draws)]
        point[name] = metric.compute(ones, labels, pair.base_pred)[0] - np.stack(per_draw).mean()
        draws_b = np.stack(
            [metric.compute(w, labels, pair.pert_pred[:, d]) for d in range(draws)], 1
        )
        boot[name] = metric.compute(w, labels, pair.base_pred) - (draws_b * dw).sum(axis=1)
    base_ld, pert_ld = pair.base_ld, pair.pert_ld
    base_p = correct_probability(labels, pair.base_margin)
    pert_p = correct_probability(labels[:, None], pair.pert_margin)
    point["logit_diff"] = base_ld.mean() - pert_ld.mean()
    point["probability"] = base_p.mean() - pert_p.mean()
    boot["logit_diff"] = (w @ base_ld - np.einsum("bn,nd,bd->b", w, pert_ld, dw)) / n
    boot["probability"] = (w @ base_p - np.einsum("bn,nd,bd->b", w, pert_p, dw)) / n
    return point, boot


def _auc_change(pair: _Pair, w: np.ndarray, dw: np.ndarray) -> tuple:
    """The change of the ROC AUC of the margin (point estimate, bootstrap), the reference's AUC
    and the perturbed one's mean over draws (NaN without both classes)."""
    pos, neg = pair.labels == 1, pair.labels == 0
    draws = pair.pert_margin.shape[1]
    ref_pairs = effects.auc_pairs(pair.base_margin[pos], pair.base_margin[neg])
    margins = pair.pert_margin
    pert_pairs = [effects.auc_pairs(margins[pos, d], margins[neg, d]) for d in range(draws)]
    both = pos.any() and neg.any()
    aucs = np.array([p.mean() for p in pert_pairs]) if both else np.full(draws, np.nan)
    ref_auc = float(ref_pairs.mean()) if both else float("nan")
    boot_pert = np.stack([effects.weighted_auc(p, w[:, pos], w[:, neg]) for p in pert_pairs], 1)
    boot = effects.weighted_auc(ref_pairs, w[:, pos], w[:, neg]) - (boot_pert * dw).sum(1)
    return ref_auc - aucs.mean(), boot, ref_auc, float(aucs.mean())


def _shift(pair: _Pair, w: np.ndarray, dw: np.ndarray) -> tuple:
    """The mean margin shift, perturbed - reference: (1,) and its bootstrap (B,); and each
    prompt's correctness with the reference's margins moved by the shift alone."""
    n, draws = pair.pert_margin.shape
    ones, one_draw = np.ones((1, n)), np.ones((1, draws)) / draws
    shift = effects.bias_shift(pair.base_margin, pair.pert_margin, ones, one_draw)
    shift_b = effects.bias_shift(pair.base_margin, pair.pert_margin, w, dw)
    shifted_c = ((pair.base_margin + shift[0] > 0).astype(int) == pair.labels).astype(float)
    return shift, shift_b, shifted_c


def _shift_accuracy(pair: _Pair, shift: np.ndarray, shift_b: np.ndarray, w: np.ndarray) -> tuple:
    """The part of the accuracy change that the mean shift alone explains: the reference's
    accuracy minus that of its margins moved by the shift
    (:func:`headperturb.analysis.effects.shift_only_accuracy`), point estimate and bootstrap."""
    n = len(pair.labels)
    shifted = effects.shift_only_accuracy(pair.labels, pair.base_margin, shift, np.ones((1, n)))[0]
    shifted_b = effects.shift_only_accuracy(pair.labels, pair.base_margin, shift_b, w)
    return pair.base_correct.mean() - shifted, w @ pair.base_correct / n - shifted_b


def _tests(pair: _Pair, shifted_c: np.ndarray, n_perm: int, seed: int) -> dict[str, float]:
    """The sign-flip p-values of the per-prompt changes (correctness, correct-label logit
    difference, the correctness the shift alone changes, each prompt's share of the AUC change),
    and the smallest detectable change of accuracy."""
    accuracy = pair.base_correct - pair.pert_correct.mean(axis=1)
    logit_diff = pair.base_ld - pair.pert_ld.mean(axis=1)
    pos, neg = pair.labels == 1, pair.labels == 0
    out = {"p_value": sign_flip_pvalue(accuracy, n_perm, seed)}
    out["detectable_change"] = detectable_change(accuracy)
    out["p_value_logit_diff"] = sign_flip_pvalue(logit_diff, n_perm, seed)
    out["p_value_bias"] = sign_flip_pvalue(pair.base_correct - shifted_c, n_perm, seed)  # 0, +-1
    out["p_value_auc"] = float("nan")
    if pos.any() and neg.any():
        flips = effects.auc_flip_values(pair.labels, pair.base_margin, pair.pert_margin)
        out["p_value_auc"] = sign_flip_pvalue(flips, n_perm, seed)
    return out


def _patch_effect(pair: _Pair, patching: tuple, w: np.ndarray, bounds: tuple) -> dict[str, float]:
    """The normalised patch effect (:func:`headperturb.analysis.effects.patch_effect`) with its
    percentile interval (``bounds``: the percentiles)."""
    clean, partner, restore = patching
    args = (pair.labels, clean, partner, pair.pert_margin[:, 0])
    ones = np.ones((1, len(pair.labels)))
    low, high = np.nanpercentile(effects.patch_effect(*args, w, restore), bounds).tolist()
    effect = float(effects.patch_effect(*args, ones, restore)[0])
    return {"patch_effect": effect, "ci_low_patch_effect": low, "ci_high_patch_effect": high}


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
