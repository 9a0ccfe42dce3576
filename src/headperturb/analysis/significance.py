"""Significance: the paired sign-flip test of a mean difference (exact on a lattice of steps,
else Monte Carlo), the Benjamini-Hochberg correction over many tests, and the smallest change a
test could detect.
"""

from __future__ import annotations

import numpy as np


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
