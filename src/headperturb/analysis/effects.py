"""What an intervention did to the margins, apart from what it did to accuracy.

A change of accuracy mixes two things. A head can move every margin the same way (a *bias*: the
threshold fitted on the unperturbed model then calls more prompts one class) or change how well the
margins rank positive above negative reviews (*discrimination*). This module measures each:

- **discrimination**: the ROC AUC of the margin against the labels (threshold-free), before and
  after, with its change (:func:`auc_pairs`, :func:`weighted_auc`, :func:`auc_flip_values`);
- **bias**: the mean change of the margin, label-independent (:func:`bias_shift`);
- **the decomposition of the accuracy change**: the part that a pure shift explains (the reference
  margins moved by the row's own mean shift, through the same decision rule) and the rest
  (:func:`shift_only_accuracy`);
- **the normalised patch effect** of patching with an opposite-sentiment partner
  (:func:`patch_effect`);
- **the effect** of a row: ``bias``, ``discrimination``, ``both`` or ``none`` (:func:`effect`).

Every function takes prompt weights (the bootstrap's resamples) where an interval is made from it;
a plain evaluation is the weighting of all ones. Pure numpy, tested against hand computations.
"""

from __future__ import annotations

import numpy as np

EFFECTS = ("bias", "discrimination", "both", "none")


def auc_pairs(positive, negative) -> np.ndarray:
    """(n_pos, n_neg): 1 where a positive review's margin is above a negative review's, 1/2 where
    they are equal, 0 below. Its mean is the ROC AUC (Mann-Whitney)."""
    diff = np.asarray(positive, dtype=float)[:, None] - np.asarray(negative, dtype=float)[None, :]
    return (diff > 0) + 0.5 * (diff == 0)


def roc_auc(labels, margins) -> float:
    """The ROC AUC of ``margins`` against ``labels`` (1 = positive); NaN without both classes."""
    labels, margins = np.asarray(labels), np.asarray(margins, dtype=float)
    pos, neg = margins[labels == 1], margins[labels == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    return float(auc_pairs(pos, neg).mean())


def weighted_auc(pairs: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray) -> np.ndarray:
    """The AUC of :func:`auc_pairs` with each prompt counted ``w`` times: (B,) for weights
    (B, n_pos) and (B, n_neg) (a bootstrap resample counts a prompt as often as it is drawn)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((w_pos @ pairs) * w_neg).sum(axis=1) / (w_pos.sum(axis=1) * w_neg.sum(axis=1))


def auc_flip_values(labels, reference, perturbed) -> np.ndarray:
    """Per-prompt values ``d`` (n,) whose sum is AUC(reference) - mean over draws of
    AUC(perturbed), times ``4 * draws * n_pos * n_neg`` (so they are integers), and whose sign
    flips give the paired permutation distribution of that change exactly.

    Swapping a prompt's reference and perturbed margins changes the AUC difference linearly in the
    swaps: with ``A = pairs(ref, ref) - pairs(pert, pert)`` and ``X = pairs(ref, pert) - pairs(pert,
    ref)`` (positives first), swapping the prompts ``s`` gives ``sum_i a_i u_i + sum_j a_j v_j``
    where ``a = 1 - 2 s``, ``u_i = sum_j (A + X)_ij / 2`` for a positive ``i`` and ``v_j = sum_i
    (A - X)_ij / 2`` for a negative ``j``. So the permutation test of the AUC change is the
    sign-flip test of these values (:func:`headperturb.analysis.significance.sign_flip_pvalue`),
    exact on their lattice. With several draws every draw's values are averaged (the same swap for
    all draws, as the accuracy test does)."""
    labels = np.asarray(labels)
    ref = np.asarray(reference, dtype=float)
    pert = np.asarray(perturbed, dtype=float).reshape(len(ref), -1)
    pos, neg = labels == 1, labels == 0
    draws = pert.shape[1]
    out = np.zeros(len(ref))
    same = auc_pairs(ref[pos], ref[neg])
    for d in range(draws):
        p = pert[:, d]
        a = same - auc_pairs(p[pos], p[neg])
        x = auc_pairs(ref[pos], p[neg]) - auc_pairs(p[pos], ref[neg])
        out[pos] += (a + x).sum(axis=1) / 2
        out[neg] += (a - x).sum(axis=0) / 2
    return np.rint(out * 4)  # multiples of 1/4 per draw: integers, summed over draws


def bias_shift(reference, perturbed, weights: np.ndarray, draw_weights: np.ndarray) -> np.ndarray:
    """The mean change of the margin, perturbed - reference, over prompts (weighted) and draws
    (weighted): (B,) for weights (B, n) and draw weights (B, draws) that sum to 1."""
    ref = np.asarray(reference, dtype=float)
    pert = np.asarray(perturbed, dtype=float).reshape(len(ref), -1)
    moved = np.einsum("bn,nd,bd->b", weights, pert, draw_weights) - weights @ ref
    return moved / weights.sum(axis=1)


def shift_only_accuracy(labels, reference, shift: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The accuracy of the reference's calibrated margins moved by ``shift`` (B,), through the
    same decision rule (positive when the moved margin is > 0): what a pure bias shift of that
    size would leave. (B,) for weights (B, n)."""
    labels, ref = np.asarray(labels), np.asarray(reference, dtype=float)
    predicted = (ref[None, :] + np.asarray(shift, dtype=float)[:, None] > 0).astype(int)
    return (weights * (predicted == labels[None, :])).sum(axis=1) / weights.sum(axis=1)


def signed(labels, margins) -> np.ndarray:
    """The margin signed by the label: the correct label's logit minus the other's."""
    return np.where(np.asarray(labels) == 1, 1.0, -1.0) * np.asarray(margins, dtype=float)


def patch_effect(labels, clean, partner, patched, weights: np.ndarray, restore: bool) -> np.ndarray:
    """The normalised effect of patching one head between a prompt and its opposite-sentiment
    partner, on the margin signed by the clean prompt's label: 0 = no change, 1 = the whole
    difference between the clean and the partner prompt (TransformerLens's convention: clean = 1,
    corrupt = 0).

    ``patch`` (noising: the clean prompt runs with the partner's head output): ``(clean -
    patched) / (clean - partner)``; ``restore`` (denoising: the partner runs with the clean
    head output): ``(patched - partner) / (clean - partner)``. A ratio of means over the prompts
    (weighted, (B,) for weights (B, n)), not a mean of per-prompt ratios, which are unbounded for
    the prompts whose clean and partner margins nearly agree."""
    c, k, x = (signed(labels, m) for m in (clean, partner, patched))
    gap = weights @ (c - k)
    moved = weights @ ((x - k) if restore else (c - x))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(gap != 0, moved / gap, np.nan)


def interval_excludes_zero(low: float, high: float) -> bool:
    return bool(low > 0 or high < 0)


def effect(
    auc_low: float,
    auc_high: float,
    auc_q: float,
    bias_low: float,
    bias_high: float,
    bias_q: float,
    alpha: float,
) -> str:
    """What a row's intervention changed, by the same rule for both, on its 95% interval and its
    q-value (Benjamini-Hochberg over the run):

    - *discrimination*: the interval of the AUC change excludes 0 and its q-value (the paired
      permutation test of the AUC change) is below ``alpha``;
    - *bias*: the interval of the shift-explained part of the accuracy change excludes 0 and its
      q-value (the exact sign-flip test of the per-prompt changes of correctness that the mean
      margin shift alone makes) is below ``alpha``: the shift alone moves enough prompts across
      the decision threshold to change the accuracy;
    - *both*, or *none* when neither holds.

    The mean shift is label-independent: a change of the margins' *scale* moves it too, by the
    margins' mean times the change, and can come out as bias when the margins are not centred on
    the threshold."""
    disc = interval_excludes_zero(auc_low, auc_high) and bool(auc_q < alpha)
    bias = interval_excludes_zero(bias_low, bias_high) and bool(bias_q < alpha)
    return {(True, True): "both", (True, False): "discrimination", (False, True): "bias"}.get(
        (disc, bias), "none"
    )
