"""The screen: every head of every layer estimated from one forward and one backward pass per
prompt (attribution patching: Nanda 2023; Syed et al. 2023; Kramár et al. 2024, "AtP*").

Setting head ``h`` of layer ``L`` to a value ``v`` changes a prompt's margin by, to first order,
``sum over positions of (v - z) . g``, where ``z`` is the head's clean output at its site (the
o_proj input) and ``g`` the margin's gradient there. One backward pass gives ``g`` for every head
of every layer at once. Per (prompt, layer, head) and over all positions or the final one alone,
:func:`headperturb.model.gradients.gradient_sums` returns ``sum z.g``, ``sum mean.g`` (``mean``:
the head's mean output over the prompts at each position from the end) and ``||g||``, from which
each kind's :meth:`~headperturb.core.kinds.Perturbation.first_order` makes its estimate: zero
``-sum z.g``, mean ``sum (mean - z).g``, and for noise of standard deviation sigma the spread
``sigma ||g||`` of the margin's change (its mean is 0 to first order), with the flip probability
that implies for each prompt.

These are estimates, not measurements: exact at the last layer's o_proj input for zero and mean
ablation (the margin is linear there), and first-order elsewhere, where a single head can be
wrong. The workflow uses them to choose which heads to measure exactly, and measures their error
on every head measured both ways (:func:`agreement`).
"""

from __future__ import annotations

import logging
from statistics import NormalDist

import numpy as np

from headperturb.core.kinds import PERTURBATIONS

log = logging.getLogger("headperturb")

KINDS = ("zero", "mean", "noise", "patch")
"""The kinds the screen estimates (those with a first-order effect on the margin)."""

COMPARED = ("zero", "mean", "patch")
"""The kinds whose estimates are compared with exact measurements (noise's is a spread)."""


_COLUMNS = (
    *("prompt_id", "layer", "head", "kind", "scale", "position"),
    *("margin_change", "logit_diff", "accuracy"),
)
"""The columns of :func:`estimates`."""


def _sums_at(sums: dict, position: str) -> dict:
    """The sums over ``position``'s positions, by name: ``z_dot_g.last`` -> ``z_dot_g``."""
    return {key.split(".")[0]: value for key, value in sums.items() if key.endswith(f".{position}")}


def estimates(
    sums: dict, prompt_ids, labels, calibrated_margins, layers: list[int], settings: list[tuple]
) -> dict[str, np.ndarray]:
    """Per (prompt, layer, head) and each (kind, position, scale, sigma) of ``settings`` (sigma
    for noise: a number, or one per (layer, head) for relative noise), as columns:
    the first-order change of the margin (zero, mean) or its spread (noise), the estimated
    contribution to the correct-label logit difference (baseline - perturbed: positive when the
    head helps) and to accuracy (for noise, the expected one from each prompt's flip chance)."""
    labels = np.asarray(labels)
    sign = np.where(labels == 1, 1.0, -1.0)[:, None, None]
    margin = np.asarray(calibrated_margins, dtype=float)[:, None, None]
    correct = ((margin > 0).astype(int) == labels[:, None, None]).astype(float)
    n, n_layers, n_heads = sums["z_dot_g.all"].shape
    columns: dict[str, list] = {k: [] for k in _COLUMNS}
    for kind, position, scale, sigma in settings:
        pert = (
            PERTURBATIONS[kind](scale=1.0).resolve() if kind == "noise" else PERTURBATIONS[kind]()
        )
        first = pert.first_order(_sums_at(sums, position))
        if kind == "noise":  # the spread for sigma 1, times each head's sigma
            first = first * np.broadcast_to(sigma, (n_layers, n_heads))[None]
            flip = np.vectorize(lambda s, m: NormalDist().cdf(-abs(m) / s) if s > 0 else 0.0)(
                first, margin
            )
            accuracy, logit_diff = np.where(correct == 1, flip, -flip), np.zeros_like(first)
        else:  # a prompt without an estimate (patch without a partner) stays NaN
            flipped = (((margin + first) > 0).astype(int)) == labels[:, None, None]
            accuracy = np.where(np.isnan(first), np.nan, correct - flipped)
            logit_diff = -sign * first
        columns["prompt_id"].append(np.repeat(np.asarray(prompt_ids), n_layers * n_heads))
        columns["layer"].append(np.tile(np.repeat(layers, n_heads), n))
        columns["head"].append(np.tile(np.arange(n_heads), n * n_layers))
        for key, value in (("kind", kind), ("scale", scale), ("position", position)):
            columns[key].append(np.repeat(value, n * n_layers * n_heads))
        for key, value in (
            ("margin_change", first),
            ("logit_diff", logit_diff),
            ("accuracy", accuracy),
        ):
            columns[key].append(np.broadcast_to(value, first.shape).reshape(-1).astype(float))
    return {k: np.concatenate(v) for k, v in columns.items()}


def per_head(frame):
    """One row per (kind, scale, position, layer, head): the estimates averaged over prompts, and
    the head's rank by the size of its estimated logit-difference contribution within its setting
    (noise: by the size of the margin's spread)."""
    keys = ["kind", "scale", "position", "layer", "head"]
    heads = frame.groupby(keys, as_index=False)[["margin_change", "logit_diff", "accuracy"]].mean()
    heads = heads.rename(
        columns={
            "logit_diff": "est_logit_diff",
            "accuracy": "est_accuracy",
            "margin_change": "est_margin_change",
        }
    )
    size = np.where(
        heads["kind"] == "noise", heads["est_margin_change"].abs(), heads["est_logit_diff"].abs()
    )
    heads["rank"] = (
        heads.assign(_size=size)
        .groupby(["kind", "scale", "position"])["_size"]
        .rank(ascending=False, method="first")
        .astype(int)
    )
    return heads.sort_values(["kind", "scale", "position", "rank"], ignore_index=True)


def pool(heads, layers: list[int], position: str):
    """The screen's zero-ablation rows of ``layers`` at ``position``: the heads a screened sweep
    chooses from, in layer and head order."""
    rows = heads[
        (heads["kind"] == "zero") & (heads["position"] == position) & heads["layer"].isin(layers)
    ]
    return rows.sort_values(["layer", "head"])


def choose(
    heads, layers: list[int], position: str, top: int, random: int, seed: int
) -> dict[int, list[int]]:
    """The heads to measure exactly: the ``top`` largest zero-ablation estimates among ``layers``
    at ``position``, and ``random`` other heads drawn with ``seed`` so the screen's misses are
    measured too. The draw is one seeded order of all the heads, whose first ``random`` heads
    outside the top are taken, so a larger ``top`` keeps the earlier choice and adds to it.
    ``{layer: [heads]}``."""
    rows = pool(heads, layers, position)
    keys = list(zip(rows["layer"], rows["head"]))
    ranked = [keys[i] for i in np.argsort(rows["rank"].to_numpy(), kind="stable")]
    chosen = set(ranked[:top])
    order = np.random.default_rng(seed).permutation(len(keys))
    chosen |= set([keys[i] for i in order if keys[i] not in chosen][:random])
    out: dict[int, list[int]] = {}
    for layer, head in sorted(chosen):
        out.setdefault(int(layer), []).append(int(head))
    return out


def agreement(table, heads, threshold: float = 0.05):
    """The screen against the exact measurements, for every head measured both ways (zero and
    mean ablation and patching, same position): per (kind, position, layer) and overall, the
    Spearman and Pearson correlations of estimated against exact change of the correct-label
    logit difference, the share of equal signs and the largest miss; and the rows that differ by
    more than ``threshold``. Returns (summary rows, disagreement rows) as DataFrames."""
    import pandas as pd

    exact = table[table["kind"].isin(COMPARED)][
        ["kind", "position", "layer", "head", "change_logit_diff"]
    ]
    both = exact.merge(
        heads[heads["kind"].isin(COMPARED)], on=["kind", "position", "layer", "head"]
    )
    both = both.rename(columns={"change_logit_diff": "exact_logit_diff"})
    both["miss"] = both["est_logit_diff"] - both["exact_logit_diff"]
    rows = []
    for key, group in [
        *both.groupby(["kind", "position", "layer"]),
        *both.groupby(["kind", "position"]),
    ]:
        key = key if len(key) == 3 else (*key, "all")
        rows.append(
            {
                "kind": key[0],
                "position": key[1],
                "layer": key[2],
                "heads": len(group),
                **_compare(
                    group["est_logit_diff"].to_numpy(), group["exact_logit_diff"].to_numpy()
                ),
                "largest_miss": float(group["miss"].abs().max()),
                "largest_miss_head": _head_name(group.loc[group["miss"].abs().idxmax()]),
            }
        )
    disagree = both[both["miss"].abs() > threshold].sort_values("miss", key=abs, ascending=False)
    return pd.DataFrame(rows), disagree.reset_index(drop=True)


def _head_name(row) -> str:
    return f"L{int(row['layer'])}H{int(row['head'])}"


def _compare(est: np.ndarray, exact: np.ndarray) -> dict:
    """Spearman (Pearson of average ranks) and Pearson correlations and the share of equal signs."""
    import pandas as pd

    signs = float(np.mean(np.sign(est) == np.sign(exact)))
    if len(est) < 3 or np.ptp(est) == 0 or np.ptp(exact) == 0:
        return {"spearman": float("nan"), "pearson": float("nan"), "sign_agreement": signs}
    ranks = [pd.Series(x).rank().to_numpy() for x in (est, exact)]
    return {
        "spearman": float(np.corrcoef(*ranks)[0, 1]),
        "pearson": float(np.corrcoef(est, exact)[0, 1]),
        "sign_agreement": signs,
    }
