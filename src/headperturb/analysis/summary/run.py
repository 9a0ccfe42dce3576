"""The run and its heads: the setup, the baseline and its decision rule, the impact categories
and the strongest heads of every setting."""

from __future__ import annotations

import pandas as pd

from headperturb.analysis import stats
from headperturb.analysis.effects import EFFECTS
from headperturb.analysis.labels import rows_of, setting_label
from headperturb.analysis.labels import settings as run_settings
from headperturb.analysis.summary.common import head_lines, table_head, table_row


def setup(settings: dict, model_info: dict, prompt_info: dict, base: dict) -> list[str]:
    model, data, prompts = settings["model"], settings["data"], settings["prompts"]
    pert = settings["perturbation"]
    sweeps = pert.get("sweeps") or [{}]
    described = "; ".join(
        ", ".join(f"{k} {s.get(k, pert.get(k))}" for k in ("layers", "heads", "kinds", "positions"))
        for s in sweeps
    )
    source = model.get("path") or model.get("pypi_wheel", {}).get("requirement")
    mean_tokens = prompt_info.get("mean_tokens", 0)
    return [
        "## Setup",
        "",
        f"- Model: `{source}` "
        f"({model_info.get('architecture')}, {model_info.get('n_layers')} layers x "
        f"{model_info.get('n_heads')} query heads, head_dim {model_info.get('head_dim')}, "
        f"{model_info.get('n_parameters', 0) / 1e6:.1f}M parameters, weights sha256 "
        f"`{str(model_info.get('weights_sha256'))[:16]}...`), {model.get('dtype')}.",
        f"- Data: IMDB from `{data.get('path') or data.get('hub_dataset')}`.",
        f"- Prompts: {prompts['k_shot']}-shot, {base.get('n_prompts', '?')} balanced test reviews "
        f"cut to {prompts['max_review_tokens']} tokens, about {mean_tokens:.0f} "
        f"tokens each; template `{prompts['template']!r}`; verbalizers {prompts['verbalizers']}.",
        f"- Perturbations: {described}; noise scales {pert['scales']} ({pert['noise_mode']}), "
        f"{pert['repeats']} draws, sites {pert['sites']}, seed {pert['seed']}.",
    ]


def baseline(base: dict, prompt_info: dict) -> list[str]:
    """The unperturbed model's scores, its decision rule and, when there was a choice, the
    candidates it was chosen from."""
    cal = prompt_info.get("calibration", {"method": "none", "offset": 0.0})
    if cal["method"] == "none":
        rule = "positive when logit(positive) - logit(negative) > 0 (no calibration)"
    else:
        rule = (
            f"positive when the margin exceeds {cal['offset']:+.4f} ({cal['method']} calibration, "
            "fitted on development reviews from train and applied unchanged to every perturbation)"
        )
    nan = float("nan")
    lines = [
        "## Baseline",
        "",
        f"Accuracy **{base.get('accuracy', nan):.3f}**, macro-F1 "
        f"**{base.get('f1', nan):.3f}**, ROC AUC of the margin "
        f"**{base.get('auc', nan):.3f}** on {base.get('n_prompts', '?')} prompts, "
        f"{100 * base.get('share_positive', nan):.0f}% predicted positive. Decision rule: {rule}.",
    ]
    selection = prompt_info.get("selection") or []
    if len(selection) > 1 or "dev_accuracy" in (selection[0] if selection else {}):
        lines += [
            "",
            "Demonstrations and decision rule, chosen on development reviews (never test):",
            "",
            *table_head(
                "candidate", "dev accuracy", "dev share positive", "dev ROC AUC", "offset", "chosen"
            ),
        ]
        for r in selection:
            lines.append(
                table_row(
                    r["candidate"],
                    f"{r.get('dev_accuracy', nan):.3f}",
                    f"{r.get('dev_share_positive', nan):.2f}",
                    f"{r.get('dev_auc', nan):.3f}",
                    f"{r.get('offset', 0.0):+.4f}",
                    "yes" if r.get("chosen") else "",
                )
            )
    return lines


def categories(table: pd.DataFrame, meta: dict, cats: dict) -> list[str]:
    """How many rows fall in each impact category, how many are significant or inconclusive, and
    how small a change the run could detect."""
    counts = stats.category_counts(table)
    alpha = meta.get("alpha", 0.05)
    inconclusive = int((~table["conclusive"]).sum())
    if meta.get("correction", "run") == "run":
        family = "over every row of the run"
    else:
        family = "within each setting: site, positions, kind and scale"
    discrimination = {c: int((table["impact_discrimination"] == c).sum()) for c in counts}
    findings = finding_counts(table)
    effect = ", ".join(f"{e} {int((table['effect'] == e).sum())}" for e in EFFECTS)
    lines = [
        "## Impact categories",
        "",
        f"{len(table)} perturbations: HIGH {counts['HIGH']} (|relative change of accuracy| > "
        f"{cats['high']:g}%; {findings['HIGH']} of them a finding), MEDIUM {counts['MEDIUM']} "
        f"({cats['medium']:g}-{cats['high']:g}%; {findings['MEDIUM']} a finding), "
        f"LOW {counts['LOW']}. A HIGH or MEDIUM row is a finding when its interval stays in its "
        "category and its effect is not `none`. "
        f"Significant after Benjamini-Hochberg (q < {alpha:g}, {family}): "
        f"{int(table['significant'].sum())} for accuracy, "
        f"{int((table['q_value_logit_diff'] < alpha).sum())} for the correct-label logit "
        "difference.",
        "",
        f"{inconclusive} of {len(table)} rows are inconclusive: their 95% interval of the relative "
        "change reaches more than one category (column `categories_spanned`), so their category is "
        "not a finding.",
        "",
        "The categories measure the change of accuracy, bias included. On the part a pure shift of "
        "the margins does not explain (`impact_discrimination`): HIGH "
        f"{discrimination['HIGH']}, MEDIUM {discrimination['MEDIUM']}, LOW "
        f"{discrimination['LOW']}. Effect: {effect}.",
    ]
    detectable = meta.get("detectable_change")
    if detectable is not None:
        lines += [
            "",
            f"Smallest change in accuracy this run could detect (80% power, two-sided "
            f"alpha {alpha:g}, median over rows, from the spread of the per-prompt "
            f"differences at {int(meta.get('baseline', {}).get('n_prompts', 0))} prompts "
            f"and its draws): {100 * detectable:.1f} points.",
        ]
    share = meta.get("stability_share")
    if share is not None:
        lines += [
            "",
            f"{100 * share:.0f}% of the heads keep their category between two halves of the "
            "noise draws.",
        ]
    return lines


def top_heads(table: pd.DataFrame, top: int) -> list[str]:
    """Per setting, the heads whose perturbation changed accuracy most (then the logit
    difference), either way."""
    lines = [
        f"## Strongest heads per setting, top {top}",
        "",
        "Positive: the head helps the task (disturbing it costs accuracy); negative: it hurts.",
    ]
    for combo in run_settings(table):
        rows = rows_of(table, combo)
        order = rows.assign(
            _a=rows["contribution_accuracy"].abs(), _l=rows["change_logit_diff"].abs()
        )
        lines += ["", f"### {setting_label(*combo)} ({len(rows)} heads)", ""]
        lines += head_lines(order.sort_values(["_a", "_l"], ascending=False).head(top))
    return lines


def finding_counts(table: pd.DataFrame) -> dict[str, int]:
    """Per impact category, the rows whose category is a finding: their interval stays in it
    (``conclusive``) and their effect is not ``none`` (a HIGH change of accuracy whose interval
    reaches LOW and that neither discriminates nor shifts significantly is not one)."""
    finding = table["conclusive"].astype(bool) & (table["effect"] != "none")
    return {c: int((finding & (table["impact"] == c)).sum()) for c in stats.CATEGORIES}
