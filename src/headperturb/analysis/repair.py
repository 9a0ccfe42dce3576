"""Direct effects beside total effects: how much of what a head writes the rest of the model
repairs (Rushing & Nanda 2024; McGrath et al. 2023, the Hydra effect).

For every head and kind, per prompt and in the units of the head table's
``contribution_logit_diff`` (baseline - perturbed correct-label logit difference, positive when
the head helps):

- ``direct_effect``: the change through the head's own write to the residual stream alone, every
  later layer left out and the norms' scales frozen (:mod:`headperturb.model.direct`);
- ``total_effect``: the head's exact final-position job of the same kind, when the run has it;
- ``self_repair = direct_effect - total_effect``: what the layers above take back. Positive: the
  rest of the model makes up for part of the head's loss (or, for a head that hurts, undoes
  part of the harm); negative: the model amplifies it.

Each comes with a percentile bootstrap interval over prompts (one resampling shared by the three,
so the intervals are paired).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from headperturb.analysis import stats

COLUMNS = [
    *("site", "position", "kind", "layer", "head", "n_prompts"),
    *("direct_effect", "ci_low_direct_effect", "ci_high_direct_effect"),
    *("total_effect", "ci_low_total_effect", "ci_high_total_effect"),
    *("self_repair", "ci_low_self_repair", "ci_high_self_repair"),
]


def direct_contributions(margin_change: np.ndarray, labels) -> np.ndarray:
    """(n, layers, heads): the direct effect on each prompt's margin turned into a contribution to
    the correct-label logit difference (baseline - perturbed)."""
    sign = np.where(np.asarray(labels) == 1, 1.0, -1.0)[:, None, None]
    return -sign * margin_change


def table(
    direct: dict[str, np.ndarray],
    prompt_ids,
    totals: dict,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """One row per (kind, layer, head). ``direct[kind]`` is (n, layers, heads) of per-prompt direct
    contributions (:func:`direct_contributions`; NaN where a prompt has none, as patching without
    a partner); ``totals[(kind, layer, head)]`` the head's per-prompt total contribution (a
    Series indexed by prompt id), where the run measured it."""
    prompt_ids = np.asarray(prompt_ids)
    rng = np.random.default_rng(seed)
    where = {"site": "o_proj_input", "position": "last"}
    rows = []
    for kind, values in direct.items():
        n, n_layers, n_heads = values.shape
        for layer in range(n_layers):
            for head in range(n_heads):
                de = pd.Series(values[:, layer, head], index=prompt_ids).dropna()
                parts = _parts(de, totals.get((kind, layer, head)))
                m = len(parts["direct_effect"])
                w = rng.multinomial(m, np.full(m, 1.0 / m), size=n_boot) / m if m else None
                row = {**where, "kind": kind, "layer": layer, "head": head, "n_prompts": m}
                rows.append(row | _intervals(parts, w, level))
    return pd.DataFrame(rows, columns=COLUMNS)


def _parts(direct: pd.Series, total: pd.Series | None) -> dict[str, np.ndarray]:
    """A head's per-prompt direct effect and, where the run measured it, its total effect and
    self-repair, on the prompts both have."""
    prompts = direct.index if total is None else direct.index.intersection(total.index)
    parts = {"direct_effect": direct.loc[prompts].to_numpy()}
    if total is not None:
        parts["total_effect"] = total.loc[prompts].to_numpy()
        parts["self_repair"] = parts["direct_effect"] - parts["total_effect"]
    return parts


def _intervals(parts: dict[str, np.ndarray], w: np.ndarray | None, level: float) -> dict:
    """Each part's mean and percentile interval over the bootstrap weights ``w`` (NaN for a part
    the head lacks, or without prompts: ``w`` None)."""
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out = {}
    for name in ("direct_effect", "total_effect", "self_repair"):
        if name not in parts or w is None:
            out.update({name: np.nan, f"ci_low_{name}": np.nan, f"ci_high_{name}": np.nan})
            continue
        low, high = np.percentile(w @ parts[name], [lo, hi]).tolist()
        mean = float(parts[name].mean())
        out.update({name: mean, f"ci_low_{name}": low, f"ci_high_{name}": high})
    return out


def totals_from(frame: pd.DataFrame, baseline: pd.DataFrame) -> pd.Series:
    """A head job's per-prompt total contribution (baseline - perturbed correct-label logit
    difference, first draw), indexed by prompt id."""
    frame = frame[frame["draw"] == 0].set_index("prompt_id")
    base = baseline.set_index("prompt_id").loc[frame.index]
    labels = frame["label"].to_numpy()
    return pd.Series(
        stats.correct_logit_diff(labels, base["margin"].to_numpy())
        - stats.correct_logit_diff(labels, frame["margin"].to_numpy()),
        index=frame.index,
    )


def repair_summary(frame: pd.DataFrame) -> dict:
    """Per kind: how direct and total effects relate over the heads measured both ways."""
    out = {}
    for kind, group in frame.dropna(subset=["total_effect"]).groupby("kind"):
        significant = (group["ci_low_self_repair"] > 0) | (group["ci_high_self_repair"] < 0)
        same_sign = np.sign(group["self_repair"]) == np.sign(group["direct_effect"])
        pearson = (
            float(np.corrcoef(group["direct_effect"], group["total_effect"])[0, 1])
            if len(group) > 2
            else float("nan")
        )
        out[kind] = {
            "heads": len(group),
            "pearson": pearson,
            "sum_direct": float(group["direct_effect"].sum()),
            "sum_total": float(group["total_effect"].sum()),
            "sum_abs_direct": float(group["direct_effect"].abs().sum()),
            "sum_abs_total": float(group["total_effect"].abs().sum()),
            "repaired": int((significant & same_sign).sum()),
            "amplified": int((significant & ~same_sign).sum()),
        }
    return out
