"""``summary.md``: a run's findings on one page, for people who did not run it.

One function per section, in the module of its concern: :mod:`~headperturb.analysis.summary.run`
(the setup, the baseline, the categories and the strongest heads),
:mod:`~headperturb.analysis.summary.findings` (discrimination, patching and bias),
:mod:`~headperturb.analysis.summary.screen`, :mod:`~headperturb.analysis.summary.segments` and
:mod:`~headperturb.analysis.summary.together` (curves, self-repair),
:mod:`~headperturb.analysis.summary.anatomy` (head types, head cards); :func:`summary_markdown`
puts them together.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from headperturb.analysis.summary.anatomy import anatomy
from headperturb.analysis.summary.common import head_lines, kind_label
from headperturb.analysis.summary.findings import findings
from headperturb.analysis.summary.run import baseline, categories, setup, top_heads
from headperturb.analysis.summary.screen import screen
from headperturb.analysis.summary.segments import segments
from headperturb.analysis.summary.together import curves, repair

__all__ = ["Extras", "summary_markdown", "head_lines", "kind_label"]


@dataclass(frozen=True)
class Extras:
    """What a run measured beside its head table, each adding to the summary when given:
    ``screened``, the screen's per-head estimates, agreement and disagreements (``heads``,
    ``agreement``, ``disagreements``): the screen's section; ``pairs``, the prompts' partners:
    how many prompts patching could use; ``curves``, the joint-ablation curves (``points``, the
    ``band`` of the random orders, ``n_total`` heads): their section; ``repair``, the direct
    effects: the self-repair section; ``anatomy``, the anatomy tables (``heads``, ``shares``,
    ``types``, ``writes``, ``correlations``): what kind of head each one is, and the head cards."""

    screened: dict | None = None
    pairs: pd.DataFrame | None = None
    curves: dict | None = None
    repair: pd.DataFrame | None = None
    anatomy: dict | None = None


def summary_markdown(
    table: pd.DataFrame,
    meta: dict,
    prompt_info: dict,
    model_info: dict,
    settings: dict,
    extras: Extras | None = None,
    top: int = 5,
) -> str:
    """The summary page of a run, in Markdown: from its head ``table`` and its metadata, the
    prompts' and the model's info files and the run's ``settings`` (the config), with the
    sections of its ``extras``; ``top`` heads per table."""
    extras = extras or Extras()
    base = meta.get("baseline", {})
    sections = [
        [f"# headperturb run `{settings['run_name']}`"],
        setup(settings, model_info, prompt_info, base),
        baseline(base, prompt_info),
        findings(table, meta, extras.pairs, top),
        categories(table, meta, settings["categories"]),
        top_heads(table, top),
        screen(extras.screened, settings["screen"]["disagreement"], 10) if extras.screened else [],
        segments(table, meta.get("alpha", 0.05), top + 5),
        _curves(extras.curves),
        repair(extras.repair, top + 3) if extras.repair is not None else [],
        anatomy(extras.anatomy, settings) if extras.anatomy else [],
        [
            "Contribution = baseline - perturbed. Intervals: 95% paired bootstrap over prompts and "
            "draws. A category whose interval spans several categories, or zero, is not a finding."
        ],
    ]
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


def _curves(found: dict | None) -> list[str]:
    return curves(found["points"], found["band"], found["n_total"]) if found else []
