"""MIB's faithfulness beside the curves: the ``keep`` curves read as MIB's circuit-localization
track reads a circuit (Mueller et al. 2025, "MIB: A Mechanistic Interpretability Benchmark"), and
every order's head scores in MIB's node-level file format.

- :func:`faithfulness`: f = (m(C) - m(empty)) / (m(model) - m(empty)), C the k highest-ranked
  heads kept (every other head ablated), empty every head ablated (``keep`` at k = 0), model the
  unperturbed model; m a summarised metric of the curves (the mean correct-label logit difference,
  the ROC AUC of the calibrated margin);
- :func:`mib_curve`: f at MIB's ten sizes (:func:`headperturb.core.sets.mib_grid`: 0.1 %, ...,
  100 % of the heads, ``floor``-ed to whole heads as MIB does). A size whose k the run did not
  measure has f NaN, never an interpolation: ``ks: mib`` in a curve's config adds MIB's sizes to
  its grid (:func:`headperturb.core.sets.grid`). k = 0 is the empty circuit (f = 0), k = N the
  model (f = 1);
- :func:`areas`: CPR, the area under f, and CMD, the area under |1 - f|, by trapezoids between
  the ten sizes. ``cpr``/``cmd`` integrate over the fraction of heads (0.001 ... 1), as MIB's
  ``evaluate_area_under_curve`` does with its default ``log_scale=False``
  (``MIB_circuit_track/evaluation.py``), so f = 1 everywhere gives CPR 0.999 and CMD 0 and the
  sizes from 50 % up weigh half of it; ``cpr_log``/``cmd_log`` integrate over log10 of the
  percentage divided by its span (3 decades), each decade weighing alike, f = 1 giving 1;
- :func:`curve_summary` and :func:`intervals`: a curve's areas from its points, and their
  percentile intervals from the paired bootstrap over prompts (the prompts resampled, f and the
  areas recomputed per resample, seeded, as :func:`headperturb.analysis.stats.paired_summary`);
- :func:`mib_node_json`: an order's ranking as MIB's node-level circuit file (:func:`mib_cfg`:
  the model's part of it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from headperturb.analysis import effects, stats
from headperturb.core.sets import mib_grid

MEASURES = ("cpr", "cmd", "cpr_log", "cmd_log")
"""CPR and CMD over the fraction of heads (MIB's code) and over log10 of the percentage."""

COLUMNS = (
    "mib_sizes",
    *[c for m in MEASURES for c in (m, f"ci_low_{m}", f"ci_high_{m}")],
)
"""The columns a curve's summary gains (NaN for ``remove`` curves)."""

CI_COLUMNS = tuple(f"ci_{end}_{m}" for m in MEASURES for end in ("low", "high"))


def faithfulness(value, empty, model):
    """(value - empty) / (model - empty), NaN where the model and the empty circuit agree."""
    value, empty, model = (np.asarray(x, dtype=float) for x in (value, empty, model))
    gap = model - empty
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(gap != 0, (value - empty) / np.where(gap != 0, gap, 1.0), np.nan)


def areas(percentages, f) -> dict:
    """CPR and CMD of f at ``percentages`` (ascending, in percent), by trapezoids over the last
    axis of ``f`` (one curve, or (B, sizes) for a bootstrap): over the fraction of heads (``cpr``,
    ``cmd``, MIB's code) and over log10 of the percentage divided by its span (``cpr_log``,
    ``cmd_log``). NaN where any f is."""
    f = np.asarray(f, dtype=float)
    p = np.asarray(percentages, dtype=float)
    out = {}
    for suffix, x in (("", p / 100.0), ("_log", np.log10(p) / np.log10(p[-1] / p[0]))):
        dx = np.diff(x)
        out[f"cpr{suffix}"] = np.sum(dx * (f[..., 1:] + f[..., :-1]) / 2, axis=-1)
        gap = np.abs(1.0 - f)
        out[f"cmd{suffix}"] = np.sum(dx * (gap[..., 1:] + gap[..., :-1]) / 2, axis=-1)
    return out


def mib_curve(curve: pd.DataFrame, n_total: int, metric: str) -> pd.DataFrame:
    """One ``keep`` curve's points (one setting and order) at MIB's sizes: ``percentage``,
    ``k``, ``measured`` (the run has the point, or k = N, the unperturbed model) and ``f`` of
    ``metric`` (NaN where not measured, or without the curve's k = 0, every head ablated)."""
    values = dict(zip(curve["k"].astype(int), curve[metric].astype(float)))
    base = float(curve[f"baseline_{metric}"].iloc[0])
    values[int(n_total)] = base
    empty = values.get(0, np.nan)
    rows = []
    for percentage, k in mib_grid(int(n_total)):
        measured = k in values and 0 in values
        f = faithfulness(values[k], empty, base) if measured else np.nan
        rows.append({"percentage": percentage, "k": k, "measured": measured, "f": float(f)})
    return pd.DataFrame(rows)


def curve_summary(curve: pd.DataFrame, n_total: int, metric: str) -> dict:
    """A ``keep`` curve's :data:`COLUMNS`: how many of MIB's ten sizes it measured, CPR and CMD
    (NaN unless it measured all ten), their intervals NaN (:func:`intervals` fills them)."""
    sizes = mib_curve(curve, n_total, metric)
    measured = int(sizes["measured"].sum())
    found = areas(sizes["percentage"], sizes["f"]) if measured == len(sizes) else {}
    out: dict = {"mib_sizes": measured}
    for m in MEASURES:
        out[m] = float(found.get(m, np.nan))
        out[f"ci_low_{m}"] = out[f"ci_high_{m}"] = np.nan
    return out


@dataclass(frozen=True)
class Prompts:
    """What the intervals need: the unperturbed model's per-prompt file (``baseline``), every
    ``keep`` set file of the run (``frames``, each one point's per-prompt rows, naming its curve
    in its own columns), and the bootstrap's settings."""

    baseline: pd.DataFrame
    frames: list = field(default_factory=list)
    n_boot: int = 2000
    seed: int = 0
    level: float = 0.95

    def of(self, named: dict) -> dict[int, pd.DataFrame]:
        """The set files of one curve (``named``: its site, position, kind, order and mode), by
        k."""
        return {
            int(f["k"].iloc[0]): f
            for f in self.frames
            if all(f[c].iloc[0] == v for c, v in named.items())
        }


def intervals(frames: dict[int, pd.DataFrame], prompts: Prompts, n_total: int) -> dict:
    """Per summarised metric, the percentile intervals of :data:`MEASURES` of one ``keep`` curve
    (``frames``: its set files by k): the prompts they share resampled ``n_boot`` times (seeded),
    m recomputed for the model, the empty circuit and each of MIB's sizes on each resample, then f
    and the areas. NaN where a size was not measured."""
    if not frames:
        return {m: dict.fromkeys(CI_COLUMNS, np.nan) for m in ("logit_diff", "auc")}
    ids = sorted(set.intersection(*(set(f["prompt_id"]) for f in frames.values())))
    base = prompts.baseline.set_index("prompt_id").loc[ids]
    labels = base["label"].to_numpy()
    margins = {int(n_total): (base["margin"].to_numpy(), base["calibrated_margin"].to_numpy())}
    for k, frame in frames.items():
        rows = frame[frame["draw"] == 0].set_index("prompt_id").loc[ids]
        margins[k] = (rows["margin"].to_numpy(), rows["calibrated_margin"].to_numpy())
    rng = np.random.default_rng(prompts.seed)
    n = len(ids)
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=prompts.n_boot).astype(float)
    grid = mib_grid(int(n_total))
    lo, hi = 100 * (1 - prompts.level) / 2, 100 * (1 + prompts.level) / 2
    out = {}
    for metric in ("logit_diff", "auc"):
        m = {k: _weighted(metric, labels, pair, w) for k, pair in margins.items()}
        nan = np.full(len(w), np.nan)
        f = np.stack(
            [faithfulness(m.get(k, nan), m.get(0, nan), m[int(n_total)]) for _, k in grid], 1
        )
        found = areas([p for p, _ in grid], f)
        with np.errstate(all="ignore"):
            out[metric] = {
                f"ci_{end}_{name}": _percentile(values, q)
                for name, values in found.items()
                for end, q in (("low", lo), ("high", hi))
            }
    return out


def _weighted(metric: str, labels, pair: tuple, w: np.ndarray) -> np.ndarray:
    """The metric of one point on each resample (prompt weights ``w``, (B, n)): the mean
    correct-label logit difference of the raw margins, or the ROC AUC of the calibrated ones."""
    margin, calibrated = pair
    if metric == "logit_diff":
        return w @ stats.correct_logit_diff(labels, margin) / len(labels)
    pos, neg = labels == 1, labels == 0
    pairs = effects.auc_pairs(calibrated[pos], calibrated[neg])
    return effects.weighted_auc(pairs, w[:, pos], w[:, neg])


def _percentile(values: np.ndarray, q: float) -> float:
    finite = values[np.isfinite(values)]
    return float(np.percentile(finite, q)) if len(finite) else float("nan")


PARALLEL_TYPES = ("gptj", "phi", "cohere")
"""Model types whose attention and MLP read the same residual stream (besides those whose
config says so: ``use_parallel_residual``, ``parallel_attn``)."""


def mib_cfg(model_config: dict, n_layers: int, n_heads: int) -> dict:
    """MIB's ``cfg`` of a model (what EAP-IG's ``Graph`` needs to lay out its nodes) from its
    Hugging Face ``config.json``: ``n_layers``, ``n_heads`` (query heads), ``d_model`` (the
    hidden size) and ``parallel_attn_mlp``."""
    names = ("hidden_size", "n_embd", "d_model")
    d_model = next((model_config[k] for k in names if model_config.get(k)), None)
    if d_model is None:
        raise ValueError(f"the model's config names no hidden size ({', '.join(names)})")
    parallel = (
        bool(model_config.get("use_parallel_residual"))
        or bool(model_config.get("parallel_attn"))
        or model_config.get("model_type") in PARALLEL_TYPES
    )
    return {
        "n_layers": int(n_layers),
        "n_heads": int(n_heads),
        "d_model": int(d_model),
        "parallel_attn_mlp": parallel,
    }


def mib_node_name(layer: int, head: int) -> str:
    """An attention head as MIB names it (EAP-IG's ``AttentionNode``): ``a{layer}.h{head}``."""
    return f"a{int(layer)}.h{int(head)}"


def mib_node_json(ranking: pd.DataFrame, cfg: dict) -> str:
    """An order's ranking (:func:`headperturb.analysis.curves.ranking`: rank, layer, head, score)
    as MIB's node-level circuit file (EAP-IG's ``Graph.to_json``, read by ``Graph.from_json``):
    ``{"cfg": cfg, "nodes": {"a{layer}.h{head}": {"in_graph": true, "score": s}}, "edges": {}}``.
    ``cfg`` is the model's ``n_layers``, ``n_heads``, ``d_model``, ``parallel_attn_mlp``. Only
    heads are scored: MIB keeps unscored nodes (MLPs, the input) in every circuit, as the curves
    never ablate them. The score is the order's (larger first); a random order has none, so it
    gets (N + 1 - rank) / N, which orders the heads as its ranks do. The heads an exclusion order
    puts last without a score (the other score's top heads) get scores below every scored head's,
    in their order (the lowest score minus 1, 2, ...). Unscored heads before scored ones are
    refused (MIB would keep them in every circuit)."""
    missing = [k for k in ("n_layers", "n_heads", "d_model", "parallel_attn_mlp") if k not in cfg]
    if missing:
        raise ValueError(f"MIB's cfg needs {', '.join(missing)}")
    table = ranking.sort_values("rank", kind="stable")
    score = table["score"].astype(float)
    if score.isna().all():
        score = (len(table) + 1 - table["rank"].astype(float)) / len(table)
    elif score.isna().any():
        scored = score.notna().to_numpy()
        last = int(scored.nonzero()[0].max())
        if not scored[: last + 1].all():
            unscored = [mib_node_name(r.layer, r.head) for r in table[score.isna()].itertuples()]
            raise ValueError(
                f"{len(unscored)} heads have no score (e.g. {unscored[0]}), some ranked before "
                f"scored heads"
            )
        score = score.copy()
        score.iloc[last + 1 :] = score.iloc[last] - np.arange(1, len(score) - last)
    nodes = {
        mib_node_name(layer, head): {"in_graph": True, "score": float(s)}
        for layer, head, s in zip(table["layer"], table["head"], score)
    }
    return json.dumps({"cfg": dict(cfg), "nodes": nodes, "edges": {}}, allow_nan=False)
