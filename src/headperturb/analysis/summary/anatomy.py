"""What kind of head each one is, and a card for each head the findings name
(:mod:`headperturb.analysis.anatomy`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from headperturb.analysis.anatomy import TYPE_SCORES, of_head
from headperturb.analysis.summary.common import table_head, table_row

TYPE_NAMES = {t: t.replace("_", "-") for t in TYPE_SCORES}
"""How the summary names each type score."""

PART_NAMES = {
    "first": "first token",
    "demonstrations": "demonstrations",
    "label_words": "label words",
    "template": "template",
    "review": "review",
    "final_template": "final template",
}


def anatomy(found: dict, settings: dict) -> list[str]:
    """The section: the types counted, where the heads look, the rank correlations of scores
    with effects, then the head cards (``found``: the anatomy tables ``heads``, ``shares``,
    ``types``, ``writes``, ``correlations``)."""
    from headperturb.analysis.anatomy import card_heads

    heads, config = found["heads"], settings["anatomy"]
    counts = heads["types"].str.split(", ").explode().value_counts()
    typed = ", ".join(f"{counts[t]} {t}" for t in counts.index if t != "none") or "none"
    label = int((heads["share_label_words"] >= 0.5).sum())
    sink = int((heads["share_first"] >= 0.5).sum())
    lines = [
        "## What kind of head",
        "",
        f"Every head of every layer ({len(heads)}): where it looks from the final position (its "
        "mean share of attention on each part of the prompt), its type scores on "
        f"{config['repeat_sequences']} seeded sequences of {config['repeat_length']} random "
        "tokens repeated once (a type at a score of at least "
        f"{config['type_threshold']:g}: {typed}), and what it writes at the final position, "
        "read at the unembedding (anatomy/heads.csv)" + _function_vectors(heads) + ". "
        f"{label} heads put half their attention or more on the demonstrations' label words, "
        f"{sink} on the first token.",
        "",
        *_correlations(found["correlations"]),
    ]
    for layer, head in card_heads(heads, int(config["cards"])):
        lines += ["", *card(found, layer, head)]
    return lines


def _interval(row, name: str) -> str:
    return f"{row[name]:+.3f} [{row[f'{name}_low']:+.3f}, {row[f'{name}_high']:+.3f}]"


def _function_vectors(heads: pd.DataFrame) -> str:
    """How many heads' function-vector score is above zero with its interval, and the largest
    score, where measured."""
    if "function_vector" not in heads:
        return ""
    above = heads[heads["function_vector_low"] > 0]
    best = heads.loc[heads["function_vector"].idxmax()]
    text = (
        "; with the demonstrations' labels shuffled, a head's mean clean output raises the "
        f"correct-label logit difference with an interval above 0 for {len(above)} heads"
    )
    if len(above):
        top = above.loc[above["function_vector"].idxmax()]
        text += f" (the most: L{int(top['layer'])}H{int(top['head'])}, "
        text += f"{_interval(top, 'function_vector')})"
    return text + (
        f"; the largest score: L{int(best['layer'])}H{int(best['head'])}, "
        f"{_interval(best, 'function_vector')}"
    )


def _correlations(table: pd.DataFrame) -> list[str]:
    """The scores' Spearman correlations with the sizes of the patch effect and the zero
    ablation's AUC change, over every head measured."""
    named = {"patch_effect": "patch effect", "zero_change_auc": "zero ablation's AUC change"}
    effects = [e for e in named if e in set(table["effect"])]
    if not effects:
        return []
    pivot = table.pivot_table(index="score", columns="effect", values="spearman", sort=False)
    lines = [
        "Spearman's rank correlation of each score with the size (absolute value) of each "
        "effect at the final position, over every head (near 0: the score does not order the "
        "heads by that effect); every effect in anatomy/correlations.csv:",
        "",
        *table_head("score", *(f"size of the {named[e]}" for e in effects)),
    ]
    for score, row in pivot.iterrows():
        lines.append(table_row(score, *(f"{row[e]:+.2f}" for e in effects)))
    return lines


def _with_intervals(rows: pd.DataFrame, value: str, names: dict[str, str]) -> str:
    """``name value [low, high]`` for each of ``names`` (the index of ``rows``: one head's)."""
    return ", ".join(
        f"{label} {rows.at[n, value]:.2f} [{rows.at[n, 'ci_low']:.2f}, {rows.at[n, 'ci_high']:.2f}]"
        for n, label in names.items()
    )


def _tokens(texts) -> str:
    return ", ".join(f"`{t!r}`" for t in texts[:5])


def _writes(writes: pd.DataFrame, layer: int, head: int) -> list[str]:
    rows = of_head(writes, layer, head).set_index("write")
    mean, contrast = rows.loc["mean"], rows.loc["contrast"]
    return [
        f"- writes on average: promotes {_tokens(mean['promoted_text'])}; the positive label "
        f"word's rank {int(mean['positive_rank'])}, the negative's {int(mean['negative_rank'])} "
        f"(label gap {mean['label_gap']:+.3f} logits)",
        f"- writes on positive minus negative reviews: promotes "
        f"{_tokens(contrast['promoted_text'])}, suppresses {_tokens(contrast['suppressed_text'])} "
        f"(label gap {contrast['label_gap']:+.3f} logits)",
    ]


def _effects(row: pd.Series) -> str:
    found = []
    if not np.isnan(row.get("patch_effect", np.nan)):
        found.append(f"patching moves {100 * row['patch_effect']:.0f} % of the partner gap")
    if not np.isnan(row.get("zero_change_logit_diff", np.nan)):
        found.append(
            f"zero ablation: logit difference baseline - ablated "
            f"{row['zero_change_logit_diff']:+.3f}, AUC change {row['zero_change_auc']:+.3f} "
            f"(effect: {row['zero_effect']})"
        )
    if not np.isnan(row.get("function_vector", np.nan)):
        found.append(f"function-vector score {_interval(row, 'function_vector')}")
    if not np.isnan(row.get("zero_direct_effect", np.nan)):
        found.append(f"direct effect {row['zero_direct_effect']:+.3f}")
    if not np.isnan(row.get("screen_rank", np.nan)):
        found.append(f"the screen's best rank {int(row['screen_rank'])}")
    if isinstance(row.get("acts_at"), str):
        found.append(f"acts at: {row['acts_at']}")
    return "; ".join(found) or "not measured alone"


def card(found: dict, layer: int, head: int) -> list[str]:
    """One head's card: its effects, where it looks, its types, what it writes, its figure."""
    row = of_head(found["heads"], layer, head).iloc[0]
    shares = of_head(found["shares"], layer, head).set_index("part")
    types = of_head(found["types"], layer, head).set_index("type")
    return [
        f"### Layer {layer} head {head}: looks at the {PART_NAMES[row['looks_at']]}, "
        f"type {row['types']}",
        "",
        f"- effects at the final position: {_effects(row)}",
        f"- attention from the final position: {_with_intervals(shares, 'share', PART_NAMES)}",
        f"- type scores: {_with_intervals(types, 'score', TYPE_NAMES)}",
        *_writes(found["writes"], layer, head),
        "",
        f"![L{layer}H{head}](plots/head_cards/L{layer}H{head}.png)",
    ]
