"""What kind of head each one is, beside what it does: the tables of the anatomy rules.

- :func:`share_table`: where each head looks from the final position, per part of the prompt
  (:data:`headperturb.data.parts.PARTS`): the mean share over prompts with a 95% percentile
  bootstrap interval over prompts;
- :func:`type_table`: previous-token, duplicate-token, induction and sink scores on repeated
  random tokens (:mod:`headperturb.model.attention`), mean over sequences with an interval;
- :func:`head_table`: one row per head joining its shares, types and what it writes with its
  measured effects (patching, zero ablation, direct effect, the screen's rank, the segment map);
- :func:`correlations`: Spearman rank correlations of every score with every effect;
- :func:`card_heads`: the heads the summary gives a card: those its findings name.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from headperturb.data.parts import PARTS

HEAD = ["layer", "head"]
TYPE_SCORES = ("previous_token", "duplicate_token", "induction", "sink")
"""The type scores on repeated random tokens (:func:`headperturb.model.attention.pattern_scores`),
in the order it returns them."""
TYPES = {
    "previous_token": "previous-token",
    "duplicate_token": "duplicate-token",
    "induction": "induction",
}
"""The types a head is called by its scores on repeated random tokens (the sink apart: it is
read from the prompts' first token)."""


def of_head(frame: pd.DataFrame, layer: int, head: int) -> pd.DataFrame:
    """The rows of one head in an anatomy table."""
    return frame[(frame["layer"] == layer) & (frame["head"] == head)]


def bootstrap(values: np.ndarray, resamples: int, seed: int) -> tuple[np.ndarray, ...]:
    """(mean, low, high) over the first axis of ``values`` (n, ...): the mean and a 95% percentile
    bootstrap interval, resampling the rows (seeded)."""
    n = values.shape[0]
    flat = values.reshape(n, -1)
    rng = np.random.default_rng(seed)
    means = np.stack([flat[rng.integers(0, n, n)].mean(0) for _ in range(resamples)])
    low, high = np.percentile(means, [2.5, 97.5], axis=0)
    shape = values.shape[1:]
    return flat.mean(0).reshape(shape), low.reshape(shape), high.reshape(shape)


def _long(layers: list[int], arrays: dict[str, np.ndarray], names: tuple, key: str):
    """One row per (layer, head, name) from arrays (n_layers, n_heads, len(names))."""
    rows = []
    first = next(iter(arrays.values()))
    for i, layer in enumerate(layers):
        for head in range(first.shape[1]):
            for j, name in enumerate(names):
                row = {"layer": layer, "head": head, key: name}
                row.update({col: float(a[i, head, j]) for col, a in arrays.items()})
                rows.append(row)
    return pd.DataFrame(rows)


def share_table(shares: np.ndarray, layers: list[int], resamples: int, seed: int) -> pd.DataFrame:
    """``shares`` (n_prompts, n_layers, n_heads, n_parts): one row per head and part: ``share``
    (the mean over prompts), ``ci_low``, ``ci_high``."""
    mean, low, high = bootstrap(shares, resamples, seed)
    arrays = {"share": mean, "ci_low": low, "ci_high": high}
    return _long(layers, arrays, PARTS, "part")


def type_table(scores: np.ndarray, layers: list[int], resamples: int, seed: int) -> pd.DataFrame:
    """``scores`` (n_sequences, n_layers, n_heads, 4): one row per head and score of
    :data:`TYPE_SCORES`: ``score``, ``ci_low``, ``ci_high``."""
    mean, low, high = bootstrap(scores, resamples, seed)
    arrays = {"score": mean, "ci_low": low, "ci_high": high}
    return _long(layers, arrays, TYPE_SCORES, "type")


def _wide(frame: pd.DataFrame, key: str, value: str, prefix: str = "") -> pd.DataFrame:
    out = frame.pivot_table(index=HEAD, columns=key, values=value, sort=False)
    out.columns = [f"{prefix}{c}" for c in out.columns]
    return out


def head_types(row, threshold: float) -> str:
    """The types whose score is at least ``threshold``, highest first ("none" where none is)."""
    found = [(row[s], name) for s, name in TYPES.items() if row[s] >= threshold]
    return ", ".join(name for _, name in sorted(found, reverse=True)) or "none"


def _effects(table: pd.DataFrame, kind: str, columns: dict) -> pd.DataFrame:
    """A setting's rows at the final position (site o_proj_input), their ``columns`` renamed."""
    part = table[
        (table["kind"] == kind) & (table["position"] == "last") & (table["site"] == "o_proj_input")
    ]
    return part.set_index(HEAD)[list(columns)].rename(columns=columns)


EFFECTS = {
    "patch": {
        "patch_effect": "patch_effect",
        "change_auc": "patch_change_auc",
        "change_logit_diff": "patch_change_logit_diff",
    },
    "zero": {
        "change_logit_diff": "zero_change_logit_diff",
        "change_auc": "zero_change_auc",
        "bias_shift": "zero_bias_shift",
        "effect": "zero_effect",
    },
}
"""The measured effects joined per head: setting -> the table's columns and their names here."""


def head_table(shares, types, writes, table=None, **measured) -> pd.DataFrame:
    """One row per head: its share of attention on each part (``share_<part>``, the part it
    looks at most: ``looks_at``), its type scores and ``types`` (scores of at least
    ``measured["threshold"]``, default 0.4), its contrast write's ``label_gap`` and top promoted
    tokens and its mean write's; and where measured its effects (:data:`EFFECTS`), direct effect
    (``direct``: the direct-effects table), its function-vector score with its interval
    (``function_vectors``), the screen's best rank over its kinds at the final
    position (``screen``) and the segment map's ``acts_at`` (``segments``)."""
    out = _wide(shares, "part", "share", "share_")
    out["looks_at"] = out[[f"share_{p}" for p in PARTS]].idxmax(axis=1).str[len("share_") :]
    out = out.join(_wide(types, "type", "score"))
    out["types"] = out.apply(head_types, axis=1, threshold=measured.get("threshold", 0.4))
    for write in ("contrast", "mean"):
        part = writes[writes["write"] == write].set_index(HEAD)
        out[f"{write}_label_gap"] = part["label_gap"]
        out[f"{write}_promotes"] = part["promoted_text"].map(lambda t: " | ".join(t[:5]))
    if table is not None:
        for kind, columns in EFFECTS.items():
            found = _effects(table, kind, {k: v for k, v in columns.items() if k in table})
            out = out.join(found) if len(found) else out
    if measured.get("function_vectors") is not None:
        fv = measured["function_vectors"].set_index(HEAD)
        out["function_vector"] = fv["function_vector"]
        out["function_vector_low"], out["function_vector_high"] = fv["ci_low"], fv["ci_high"]
    if measured.get("direct") is not None:
        direct = measured["direct"]
        direct = direct[direct["kind"] == "zero"].set_index(HEAD)["direct_effect"]
        out["zero_direct_effect"] = direct
    if measured.get("screen") is not None:
        screen = measured["screen"]
        if (screen["position"] == "last").any():
            screen = screen[screen["position"] == "last"]
        out["screen_rank"] = screen.groupby(HEAD)["rank"].min()
    if measured.get("segments") is not None and len(measured["segments"]):
        out["acts_at"] = measured["segments"].groupby(HEAD)["acts_at"].first()
    return out.reset_index()


SCORES = (
    *(f"share_{p}" for p in PARTS),
    *TYPE_SCORES,
    "function_vector",
    "contrast_label_gap",
    "mean_label_gap",
)
MEASURED = (
    "patch_effect",
    "patch_change_auc",
    "zero_change_logit_diff",
    "zero_change_auc",
    "zero_bias_shift",
    "zero_direct_effect",
)


def _ranks(x: pd.Series) -> pd.Series:
    return x.rank(method="average")


def correlations(heads: pd.DataFrame) -> pd.DataFrame:
    """Spearman's rank correlation of each score with each effect's size (its absolute value:
    ``effect`` names the column) over the heads where both are measured, with their number."""
    rows = []
    for effect in (m for m in MEASURED if m in heads):
        size = heads[effect].abs()
        for score in (s for s in SCORES if s in heads):
            both = heads[score].notna() & size.notna()
            n = int(both.sum())
            rho = np.nan
            if n > 2 and heads.loc[both, score].nunique() > 1 and size[both].nunique() > 1:
                rho = float(np.corrcoef(_ranks(heads.loc[both, score]), _ranks(size[both]))[0, 1])
            rows.append({"score": score, "effect": effect, "spearman": rho, "heads": n})
    return pd.DataFrame(rows, columns=["score", "effect", "spearman", "heads"])


def card_heads(heads: pd.DataFrame, per_list: int = 3) -> list[tuple[int, int]]:
    """The heads that get a card: the ``per_list`` largest by |patch effect|, by |zero ablation's
    change of the logit difference| and by the screen's rank, in that order, each once."""
    chosen: list[tuple[int, int]] = []
    lists = [
        ("patch_effect", lambda s: -s.abs()),
        ("zero_change_logit_diff", lambda s: -s.abs()),
        ("screen_rank", lambda s: s),
    ]
    for column, key in lists:
        if column not in heads:
            continue
        ordered = heads.dropna(subset=[column]).sort_values(column, key=key, kind="stable")
        for layer, head in ordered[HEAD].head(per_list).itertuples(index=False):
            if (int(layer), int(head)) not in chosen:
                chosen.append((int(layer), int(head)))
    return chosen


ORDER_SCORES = {
    "induction": "induction",
    "function_vector": "function_vector",
    "label_attention": "share_label_words",
}
"""The score each anatomy order ranks by (a column of :func:`head_scores`)."""

EXCLUSIONS = {
    "induction_exclusive": ("induction", "function_vector"),
    "function_vector_exclusive": ("function_vector", "induction"),
}
"""The exclusion controls (Yin & Steinhardt 2025): an order, and the order whose top heads it
puts last."""


def head_scores(shares, types, function_vectors=None) -> pd.DataFrame:
    """One row per head with the scores the anatomy orders rank by: ``induction``,
    ``share_label_words`` and, where measured, ``function_vector``."""
    out = _wide(types, "type", "score")[["induction"]]
    out = out.join(_wide(shares, "part", "share", "share_")[["share_label_words"]])
    if function_vectors is not None:
        out = out.join(function_vectors.set_index(HEAD)[["function_vector"]])
    return out.reset_index()


def order_scores(order: str, scores: pd.DataFrame, exclude: int) -> pd.DataFrame:
    """(layer, head, score) of every head under an anatomy order
    (:data:`headperturb.core.sets.ANATOMY_ORDERS`): its score (:data:`ORDER_SCORES`); an
    exclusion control (:data:`EXCLUSIONS`) puts the other order's ``exclude`` highest heads last
    (score NaN)."""
    name, other = EXCLUSIONS.get(order, (order, None))
    column = ORDER_SCORES[name]
    if column not in scores:
        raise ValueError(f"the order {order} needs the heads' {column} scores")
    out = scores[HEAD].assign(score=scores[column])
    if other is not None:
        top = scores.sort_values(ORDER_SCORES[other], ascending=False, kind="stable")
        excluded = top.head(exclude).index
        out.loc[excluded, "score"] = np.nan
    return out
