"""Joint-ablation curves: how much of the task survives when the k highest-ranked heads are
removed together (``remove``), or when every head but them is (``keep``), against random orders.

- :func:`ranking`: every head of the model ranked best first under an order: the screen's
  estimated contribution to the correct-label logit difference (same kind and position), the
  run's exact single-head measurement of the same setting, or a seeded random permutation;
- :func:`point_row`: one set job's file reduced to its row, every metric of the head table with
  its paired bootstrap interval against the unperturbed model on the same prompts
  (:func:`headperturb.analysis.stats.paired_summary`), and the share of the baseline's margin
  above chance it retains;
- :func:`interaction`: the joint change minus the sum of the same heads' single changes
  (perturbed - baseline), per prompt, with its interval: negative means the heads back each
  other up (removing them together costs more than the sum of removing each), positive that
  they overlap in what they remove;
- :func:`summarize`: per curve the normalised area under the retained share and the smallest k
  (on the curve's grid) whose removal loses half of the baseline's margin above chance, or whose
  keeping retains half of it, for the correct-label logit difference and the ROC AUC, and for
  ``keep`` curves MIB's CPR and CMD (:mod:`headperturb.analysis.faithfulness`).

Chance is 0 for the logit difference and 0.5 for the AUC and accuracy; the retained share is
``(value - chance) / (baseline - chance)``, undefined (NaN) where the unperturbed model is not
above chance on that metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from headperturb.analysis import effects, faithfulness, stats
from headperturb.analysis.scoring import metrics
from headperturb.core import files
from headperturb.core.kinds import PERTURBATIONS
from headperturb.core.sets import ANATOMY_ORDERS

SET_KEYS = ["site", "position", "kind", "order", "seed", "mode", "k"]
"""The columns that name a point of a curve."""

CURVE_KEYS = ["site", "position", "kind", "order", "mode"]
"""The columns that name a curve (an order name holds its seed: ``random2``)."""

CHANCE = {"logit_diff": 0.0, "auc": 0.5, "accuracy": 0.5}
"""The value of each curve metric for a model that does not do the task."""

SUMMARIZED = ("logit_diff", "auc")
"""The metrics whose curves are summarised (areas and half points)."""


class RankingError(ValueError):
    """An order that cannot rank the heads from what the run has."""


@dataclass(frozen=True)
class Setting:
    """The heads' setting that a ranking orders: a curve's site, positions and kind."""

    site: str
    position: str
    kind: str


def ranking(
    order: str,
    setting: Setting,
    n_layers: int,
    n_heads: int,
    *,
    seed: int = 0,
    screen_heads: pd.DataFrame | None = None,
    table: pd.DataFrame | None = None,
    anatomy: dict | None = None,
) -> pd.DataFrame:
    """Every (layer, head) ranked best first (``rank`` 1..N) with its ``score``: the estimated
    (``screen``, from ``screen_heads``) or measured (``exact``, from the run's ``table``)
    contribution to the correct-label logit difference of the ``setting``, larger first;
    ``random``: a permutation seeded with ``seed`` (score NaN); a kind of head (``anatomy``: the
    heads' ``scores`` and how many to ``exclude``;
    :func:`headperturb.analysis.anatomy.order_scores`). Ties keep layer and head order."""
    heads = pd.DataFrame(
        [(layer, head) for layer in range(n_layers) for head in range(n_heads)],
        columns=["layer", "head"],
    )
    if order == "random":
        permutation = np.random.default_rng([int(seed), 7919]).permutation(len(heads))
        ranked = heads.iloc[permutation].assign(score=np.nan)
    elif order == "screen":
        ranked = _by_estimate(heads, setting, screen_heads)
    elif order == "exact":
        ranked = _by_measurement(heads, setting, table)
    elif order in ANATOMY_ORDERS and anatomy is not None:
        from headperturb.analysis.anatomy import order_scores

        ranked = _by_score(heads, order_scores(order, **anatomy))
    else:
        allowed = ", ".join(["screen", "exact", "random", *ANATOMY_ORDERS])
        raise RankingError(f"order {order!r} cannot rank the heads here; allowed: {allowed}")
    out = ranked.reset_index(drop=True)
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out[["rank", "layer", "head", "score"]]


def _by_estimate(
    heads: pd.DataFrame, setting: Setting, screen_heads: pd.DataFrame | None
) -> pd.DataFrame:
    """The heads by the screen's estimates of the setting's kind and positions."""
    kind, position = setting.kind, setting.position
    if screen_heads is None:
        raise RankingError("the screen order needs the screen's estimates (screen/heads.parquet)")
    rows = screen_heads[(screen_heads["kind"] == kind) & (screen_heads["position"] == position)]
    if rows.empty:
        raise RankingError(
            f"the screen did not estimate {kind} at position {position}: add {kind} to "
            f"screen.kinds and {position} to screen.positions, or rank by another order"
        )
    return _by_score(heads, rows.rename(columns={"est_logit_diff": "score"}))


def _by_measurement(
    heads: pd.DataFrame, setting: Setting, table: pd.DataFrame | None
) -> pd.DataFrame:
    """The heads by the run's single-head measurements of the setting; every head must have one."""
    site, position, kind = setting.site, setting.position, setting.kind
    if table is None:
        raise RankingError("the exact order needs the run's contribution table")
    rows = table[
        (table["site"] == site) & (table["position"] == position) & (table["kind"] == kind)
    ]
    ranked = _by_score(heads, rows.rename(columns={"change_logit_diff": "score"}))
    if ranked["score"].isna().any():
        missing = int(ranked["score"].isna().sum())
        raise RankingError(
            f"the exact order of {kind} at position {position} ({site}) needs every head "
            f"measured alone; {missing} of {len(heads)} are not: add a sweep "
            f"{{layers: all, heads: all, kinds: [{kind}], positions: [{position}]}}"
        )
    return ranked


def read_ranking(path) -> list[tuple[int, int]]:
    """(layer, head) of every head, best first, from a ranking file."""
    table = files.read_columns(path, ["rank", "layer", "head"])
    order = np.argsort(np.asarray(table["rank"]), kind="stable")
    return [(int(table["layer"][i]), int(table["head"][i])) for i in order]


def _by_score(heads: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    merged = heads.merge(rows[["layer", "head", "score"]], on=["layer", "head"], how="left")
    return merged.sort_values("score", ascending=False, kind="stable", na_position="last")


def per_prompt_change(frame: pd.DataFrame, baseline: pd.DataFrame) -> pd.Series:
    """Per prompt (index prompt_id): the change of the correct-label logit difference,
    baseline - perturbed (a head's or a set's contribution)."""
    frame = frame[frame["draw"] == 0].set_index("prompt_id")
    base = baseline.set_index("prompt_id").loc[frame.index]
    labels = frame["label"].to_numpy()
    change = stats.correct_logit_diff(labels, base["margin"].to_numpy()) - stats.correct_logit_diff(
        labels, frame["margin"].to_numpy()
    )
    return pd.Series(change, index=frame.index)


def point_row(frame: pd.DataFrame, baseline: pd.DataFrame, **stat_kwargs) -> dict:
    """One set job's row: its settings, the unperturbed and perturbed metrics on its prompts, the
    changes with intervals and p-values, and the retained shares."""
    first = frame.iloc[0]
    row = {key: first[key] for key in [*SET_KEYS, "n_heads"]}
    row["seed"], row["k"], row["n_heads"] = int(row["seed"]), int(row["k"]), int(row["n_heads"])
    frame = frame.sort_values("prompt_id")
    labels = frame["label"].to_numpy()
    clean = baseline.set_index("prompt_id").loc[frame["prompt_id"]]
    patching = None
    if PERTURBATIONS[str(first["kind"])].paired:
        partner = baseline.set_index("prompt_id").loc[frame["partner_id"]]
        patching = (
            clean["calibrated_margin"].to_numpy(),
            partner["calibrated_margin"].to_numpy(),
            False,
        )
    out = stats.paired_summary(
        labels,
        (clean["prediction"].to_numpy(), clean["calibrated_margin"].to_numpy()),
        (frame["prediction"].to_numpy(), frame["calibrated_margin"].to_numpy()),
        patching=patching,
        **stat_kwargs,
    )
    row["n_prompts"] = len(frame)
    row["baseline_accuracy"] = metrics(labels, clean["prediction"])["accuracy"]
    row["accuracy"] = metrics(labels, frame["prediction"])["accuracy"]
    row["baseline_logit_diff"] = float(stats.correct_logit_diff(labels, clean["margin"]).mean())
    row["logit_diff"] = float(stats.correct_logit_diff(labels, frame["margin"]).mean())
    row["baseline_auc"] = effects.roc_auc(labels, clean["calibrated_margin"])
    row.update(out)
    for name, chance in CHANCE.items():  # undefined where the model is not above chance
        base = row[f"baseline_{name}"]
        row[f"retained_{name}"] = (
            (row[name] - chance) / (base - chance) if base > chance else np.nan
        )
    return row


def interaction(
    joint: pd.Series,
    singles: list[pd.Series],
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """How far a set's joint effect is from the sum of its members' single effects.

    ``joint`` and ``singles`` are per-prompt contributions to the correct-label logit difference
    (baseline - perturbed, indexed by prompt id; :func:`per_prompt_change`). On the prompts they
    share, with changes counted perturbed - baseline as the issue of interactions is usually put:
    ``interaction = joint change - sum of the single changes``. Negative: removing the heads
    together costs more than the sum of removing each (they back each other up); positive: less
    (they overlap in what they remove). With a percentile bootstrap interval over prompts."""
    common = joint.index
    for s in singles:
        common = common.intersection(s.index)
    joint_change = -joint.loc[common].to_numpy()
    singles_change = -sum(s.loc[common].to_numpy() for s in singles)
    values = joint_change - singles_change
    rng = np.random.default_rng(seed)
    n = len(values)
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot) / n
    lo, hi = np.percentile(w @ values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return {
        "joint_change_logit_diff": float(joint_change.mean()),
        "singles_change_logit_diff": float(singles_change.mean()),
        "interaction_logit_diff": float(values.mean()),
        "ci_low_interaction_logit_diff": float(lo),
        "ci_high_interaction_logit_diff": float(hi),
    }


INTERACTION_COLUMNS = (
    "joint_change_logit_diff",
    "singles_change_logit_diff",
    "interaction_logit_diff",
    "ci_low_interaction_logit_diff",
    "ci_high_interaction_logit_diff",
)


def _anchored(
    curve: pd.DataFrame, mode: str, n_total: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """(k, retained share) of one curve with the unperturbed model as its anchor: removing none
    (``remove``, k = 0) or keeping all (``keep``, k = N) retains everything."""
    k = curve["k"].to_numpy(dtype=float)
    share = curve[f"retained_{metric}"].to_numpy(dtype=float)
    anchor = 0.0 if mode == "remove" else float(n_total)
    if anchor not in k:
        k, share = np.append(k, anchor), np.append(share, 1.0)
    order = np.argsort(k)
    return k[order], share[order]


def summarize(
    points: pd.DataFrame, n_total: int, prompts: faithfulness.Prompts | None = None
) -> pd.DataFrame:
    """Per curve (site, position, kind, order, mode) and summarised metric: the normalised area
    under the retained share over k / N (trapezoids between the grid's points, anchored at the
    unperturbed model), and ``k_half``: the smallest k of the grid whose removal leaves at most
    half (``remove``), or whose keeping retains at least half (``keep``); NaN where none does.
    ``keep`` curves also get MIB's CPR and CMD (the columns of
    :data:`headperturb.analysis.faithfulness.COLUMNS`, NaN for ``remove``), with their bootstrap
    intervals where ``prompts`` holds the set files
    (:func:`headperturb.analysis.faithfulness.intervals`)."""
    rows = []
    curves = points[points["mode"].isin(["remove", "keep"])]
    for key, curve in curves.groupby(CURVE_KEYS, sort=True):
        mode = key[-1]
        mib = _mib(curve, key, n_total, prompts) if mode == "keep" else {}
        for metric in SUMMARIZED:
            k, share = _anchored(curve, mode, n_total, metric)
            row = {**dict(zip(CURVE_KEYS, key)), "metric": metric, "points": len(curve)}
            extra = mib.get(metric, dict.fromkeys(faithfulness.COLUMNS, np.nan))
            if np.isnan(share).any():  # the model is not above chance: nothing to retain
                rows.append({**row, "area": np.nan, "k_half": np.nan, **extra})
                continue
            x = k / n_total
            area = float(np.sum((share[1:] + share[:-1]) / 2 * np.diff(x)))
            hit = share <= 0.5 if mode == "remove" else share >= 0.5
            k_half = float(k[hit].min()) if hit.any() else np.nan
            rows.append({**row, "area": area, "k_half": k_half, **extra})
    columns = [*CURVE_KEYS, "metric", "points", "area", "k_half", *faithfulness.COLUMNS]
    return pd.DataFrame(rows, columns=columns)


def _mib(curve: pd.DataFrame, key: tuple, n_total: int, prompts) -> dict:
    """A ``keep`` curve's MIB columns per summarised metric, with intervals where ``prompts``
    holds its set files and it measured all of MIB's sizes."""
    out = {metric: faithfulness.curve_summary(curve, n_total, metric) for metric in SUMMARIZED}
    complete = all(out[m]["mib_sizes"] == len(faithfulness.mib_grid(n_total)) for m in out)
    if prompts is not None and complete:
        found = faithfulness.intervals(prompts.of(dict(zip(CURVE_KEYS, key))), prompts, n_total)
        for metric in SUMMARIZED:
            out[metric].update(found[metric])
    return out


def is_random(order: str) -> bool:
    return str(order).startswith("random")


def control_band(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary with the random orders of each setting put together: per (site, position,
    kind, mode, metric) the median, lowest and highest area and k_half over the seeds, beside
    each ranked order's own; then MIB's CPR and CMD
    (:data:`headperturb.analysis.faithfulness.MEASURES`) the same way, each ranked order's with
    its interval, the random row's the median over the seeds without one."""
    rows = []
    group_keys = ["site", "position", "kind", "mode", "metric"]
    mib = [c for c in faithfulness.COLUMNS if c in summary.columns]
    for key, group in summary.groupby(group_keys, sort=True):
        randoms = group[group["order"].map(is_random)]
        named, band = dict(zip(group_keys, key)), _band(randoms)
        band_mib = _band_mib(randoms, mib)
        for _, row in group[~group["order"].map(is_random)].iterrows():
            ranked = {"order": row["order"], "area": row["area"], "k_half": row["k_half"]}
            rows.append({**named, **ranked, **band, **{c: row[c] for c in mib}, **band_mib})
        if not randoms.empty:
            area, k_half = float(randoms["area"].median()), float(randoms["k_half"].median())
            ranked = {"order": "random", "area": area, "k_half": k_half}
            mib_row = {c: _random_mib(randoms, c) for c in mib}
            rows.append({**named, **ranked, **band, **mib_row, **band_mib})
    return pd.DataFrame(rows)


def _random_mib(randoms: pd.DataFrame, column: str) -> float:
    """The random row's value of a MIB column: the median measure over the seeds, the fewest
    sizes measured (``mib_sizes``), no interval."""
    if column in faithfulness.MEASURES:
        return float(randoms[column].median())
    return float(randoms[column].min()) if column == "mib_sizes" else np.nan


def _band(randoms: pd.DataFrame) -> dict:
    if randoms.empty:
        return {
            "random_seeds": 0,
            "random_area_median": np.nan,
            "random_area_low": np.nan,
            "random_area_high": np.nan,
            "random_k_half_median": np.nan,
            "random_k_half_low": np.nan,
            "random_k_half_high": np.nan,
        }
    return {
        "random_seeds": len(randoms),
        "random_area_median": float(randoms["area"].median()),
        "random_area_low": float(randoms["area"].min()),
        "random_area_high": float(randoms["area"].max()),
        "random_k_half_median": float(randoms["k_half"].median()),
        "random_k_half_low": float(randoms["k_half"].min()),
        "random_k_half_high": float(randoms["k_half"].max()),
    }


def _band_mib(randoms: pd.DataFrame, mib: list[str]) -> dict:
    """The random orders' median, lowest and highest of each MIB measure the summary has (NaN
    without random orders)."""
    out = {}
    for m in (c for c in faithfulness.MEASURES if c in mib):
        values = randoms[m].astype(float)
        out[f"random_{m}_median"] = float(values.median()) if len(values) else np.nan
        out[f"random_{m}_low"] = float(values.min()) if len(values) else np.nan
        out[f"random_{m}_high"] = float(values.max()) if len(values) else np.nan
    return out
