"""Discrimination, bias, the decomposition of the accuracy change and the patch effect, against
hand computations and brute force."""

import itertools
import math

import numpy as np
import pytest

from headperturb.analysis import effects, stats


def test_auc_by_hand_and_against_scikit_learn():
    # positives 3, 1; negatives 2, 1: pairs (3>2, 3>1, 1<2, 1=1) -> (1 + 1 + 0 + 0.5) / 4
    assert effects.roc_auc([1, 1, 0, 0], [3.0, 1.0, 2.0, 1.0]) == pytest.approx(2.5 / 4)
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    margins = np.round(rng.normal(labels, 1.0), 1)  # rounded: ties too
    assert effects.roc_auc(labels, margins) == pytest.approx(roc_auc_score(labels, margins))
    assert np.isnan(effects.roc_auc([1, 1], [0.0, 1.0]))


def test_weighted_auc_is_the_auc_of_the_repeated_sample():
    pos, neg = np.array([3.0, 1.0, 0.5]), np.array([2.0, 1.0])
    w_pos, w_neg = np.array([[2.0, 0, 1]]), np.array([[1.0, 3]])
    repeated_pos, repeated_neg = [3.0, 3.0, 0.5], [2.0, 1.0, 1.0, 1.0]
    expected = effects.auc_pairs(repeated_pos, repeated_neg).mean()
    got = effects.weighted_auc(effects.auc_pairs(pos, neg), w_pos, w_neg)
    assert got[0] == pytest.approx(expected)


@pytest.mark.parametrize("draws", [1, 3])
def test_auc_flip_values_give_the_permutation_distribution_exactly(draws):
    """Every pattern of swapping prompts' reference and perturbed margins, by brute force, against
    the sign flips of the per-prompt values."""
    rng = np.random.default_rng(draws)
    labels = np.array([1, 0, 1, 0, 1, 0, 0])
    ref = np.round(rng.normal(labels, 1.0), 1)
    pert = np.round(ref[:, None] + rng.normal(0, 0.8, (len(ref), draws)), 1)
    values = effects.auc_flip_values(labels, ref, pert)
    assert np.allclose(values, np.rint(values))  # integers: the lattice test is exact
    n_pos, n_neg = (labels == 1).sum(), (labels == 0).sum()
    scale = 4 * draws * n_pos * n_neg

    def change(s):  # swapped prompts: reference and draw d trade places, for every draw
        changes = [
            effects.roc_auc(labels, np.where(s, pert[:, d], ref))
            - effects.roc_auc(labels, np.where(s, ref, pert[:, d]))
            for d in range(draws)
        ]
        return np.mean(changes)

    assert values.sum() / scale == pytest.approx(change(np.zeros(len(ref), bool)))
    for swap in itertools.product([False, True], repeat=len(ref)):
        s = np.array(swap)
        assert (np.where(s, -1, 1) * values).sum() / scale == pytest.approx(change(s))
    signs = np.array(list(itertools.product([-1, 1], repeat=len(ref))))
    brute = float((np.abs(signs @ values) >= abs(values.sum()) - 1e-9).mean())
    assert stats.sign_flip_pvalue(values) == pytest.approx(brute)


def test_bias_shift_and_the_shift_only_accuracy_by_hand():
    ref = np.array([1.0, -1.0, 0.5, -0.2])
    pert = np.array([[0.0, -2.0], [-2.0, -3.0], [0.0, 0.0], [-1.0, -1.0]])
    ones, draws = np.ones((1, 4)), np.full((1, 2), 0.5)
    # mean over draws: -1, -2.5, 0, -1 -> changes -2, -1.5, -0.5, -0.8 -> mean -1.2
    assert effects.bias_shift(ref, pert, ones, draws)[0] == pytest.approx(-1.2)
    labels = np.array([1, 0, 1, 0])
    # moved by -1.2: -0.2, -2.2, -0.7, -1.4 -> all negative -> two of four right
    assert effects.shift_only_accuracy(labels, ref, np.array([-1.2]), ones)[0] == 0.5


def test_patch_effect_by_hand():
    labels = np.array([1, 0])
    clean = np.array([2.0, -3.0])  # signed: 2, 3
    partner = np.array([-2.0, 1.0])  # signed: -2, -1 -> the whole difference is 4 + 4 = 8
    patched = np.array([0.0, -1.0])  # signed: 0, 1 -> clean - patched = 2 + 2 = 4
    ones = np.ones((1, 2))
    assert effects.patch_effect(labels, clean, partner, patched, ones, False)[0] == 0.5
    # restored (the partner run with the clean head): moved from the partner by 2 + 2 of 8
    assert effects.patch_effect(labels, clean, partner, patched, ones, True)[0] == 0.5
    assert effects.patch_effect(labels, clean, partner, clean, ones, False)[0] == 0.0
    assert effects.patch_effect(labels, clean, partner, clean, ones, True)[0] == 1.0


@pytest.mark.parametrize(
    "auc, q, bias, bias_q, expected",
    [
        ((0.01, 0.05), 0.001, (-0.01, 0.02), 0.5, "discrimination"),
        ((0.01, 0.05), 0.2, (-0.01, 0.02), 0.5, "none"),  # q too large
        ((-0.01, 0.05), 0.001, (0.1, 0.3), 0.001, "bias"),
        ((-0.01, 0.05), 0.001, (0.1, 0.3), 0.2, "none"),  # the shift's q too large
        ((-0.05, -0.01), 0.001, (-0.3, -0.1), 0.01, "both"),
        ((-0.05, 0.01), 0.5, (-0.3, 0.1), 0.01, "none"),
    ],
)
def test_effect_rule(auc, q, bias, bias_q, expected):
    assert effects.effect(*auc, q, *bias, bias_q, alpha=0.05) == expected


def _margins(n=200, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n // 2)
    return labels, rng.normal(np.where(labels == 1, 1.0, -1.0), 1.0)


def _summary(labels, ref, pert, **kwargs):
    pert = np.asarray(pert).reshape(len(ref), -1)
    return stats.paired_summary(
        labels,
        ((ref > 0).astype(int), ref),
        ((pert > 0).astype(int), pert),
        n_boot=400,
        n_perm=500,
        **kwargs,
    )


def test_a_pure_shift_is_all_bias_and_no_discrimination():
    labels, ref = _margins()
    out = _summary(labels, ref, ref - 1.5)
    assert out["change_auc"] == 0 and out["p_value_auc"] == 1.0
    assert out["bias_shift"] == pytest.approx(-1.5)
    assert out["ci_low_bias_shift"] == pytest.approx(-1.5) == out["ci_high_bias_shift"]
    assert out["change_accuracy"] > 0.15  # nearly everything called negative
    assert out["change_accuracy_bias"] == pytest.approx(out["change_accuracy"])
    assert out["change_accuracy_discrimination"] == pytest.approx(0.0)
    # the exact sign-flip test by hand: each prompt the shift moves across the threshold turns
    # right (-1) or wrong (+1); under the null each sign is a fair coin
    moved = (ref > 0) != (ref - 1.5 > 0)
    d = np.where((ref > 0).astype(int) == labels, 1, -1)[moved]
    m, s = len(d), abs(int(d.sum()))
    p = sum(math.comb(m, j) for j in range(m + 1) if abs(2 * j - m) >= s) / 2**m
    assert m > 10 and p < 1e-3
    assert out["p_value_bias"] == pytest.approx(p)
    found = effects.effect(
        auc_low=out["ci_low_auc"],
        auc_high=out["ci_high_auc"],
        auc_q=out["p_value_auc"],
        bias_low=out["ci_low_accuracy_bias"],
        bias_high=out["ci_high_accuracy_bias"],
        bias_q=out["p_value_bias"],
        alpha=0.05,
    )
    assert found == "bias"


def test_scrambled_margins_are_discrimination_without_bias():
    labels, ref = _margins()
    scrambled = np.random.default_rng(1).permutation(ref)  # the same margins, another order
    out = _summary(labels, ref, scrambled)
    assert out["reference_auc"] > 0.85 and abs(out["auc"] - 0.5) < 0.1
    assert out["change_auc"] > 0.3 and out["ci_low_auc"] > 0.2 and out["p_value_auc"] < 1e-6
    assert out["bias_shift"] == pytest.approx(0.0, abs=1e-12)
    assert out["change_accuracy_bias"] == 0.0
    assert out["change_accuracy_discrimination"] == pytest.approx(out["change_accuracy"])


def test_the_auc_p_value_is_exact_beyond_any_monte_carlo_floor():
    """A large AUC drop on 200 prompts: the lattice p-value is far below 1 / (1 + n_perm)."""
    labels, ref = _margins()
    out = _summary(labels, ref, -ref)  # the ranking reversed
    assert out["p_value_auc"] < 1e-20


def test_patch_effect_reaches_the_summary():
    labels, clean = _margins()
    partner = -clean  # opposite sentiment, mirrored margins
    out = _summary(labels, clean, 0.5 * clean, patching=(clean, partner, False))
    assert out["patch_effect"] == pytest.approx(0.25)  # (c - x) / (c - k) = 0.5 c / 2 c
    assert out["ci_low_patch_effect"] == pytest.approx(0.25)
