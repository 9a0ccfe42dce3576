"""The summary counts an impact category apart by whether it is a finding: a HIGH change of
accuracy whose interval reaches another category, or whose effect is none, is not one."""

from __future__ import annotations

import pandas as pd
import pytest

from headperturb.analysis.summary import run as summary_run

pytestmark = pytest.mark.unit


def test_a_category_is_counted_as_a_finding_only_when_it_holds():
    table = pd.DataFrame(
        {
            "impact": ["HIGH", "HIGH", "HIGH", "MEDIUM", "LOW"],
            "conclusive": [True, False, True, True, True],
            "effect": ["bias", "none", "none", "discrimination", "none"],
        }
    )
    assert summary_run.finding_counts(table) == {"HIGH": 1, "MEDIUM": 1, "LOW": 0}


def test_the_summary_says_how_many_are_findings():
    table = pd.DataFrame(
        {
            "impact": ["HIGH", "HIGH", "LOW"],
            "impact_discrimination": ["LOW", "LOW", "LOW"],
            "conclusive": [True, False, True],
            "effect": ["bias", "none", "none"],
            "significant": [True, False, False],
            "q_value_logit_diff": [0.01, 0.5, 0.9],
        }
    )
    text = "\n".join(summary_run.categories(table, {"alpha": 0.05}, {"high": 10, "medium": 5}))
    assert "HIGH 2 (|relative change of accuracy| > 10%; 1 of them a finding)" in text
    assert "over every row of the run" in text  # the family of the q-values is named


def test_the_summary_gives_mibs_faithfulness_beside_the_random_orders():
    """A keep curve on MIB's sizes: its CPR and CMD with their intervals beside the random
    orders' median and range; curves without them add nothing."""
    from headperturb.analysis.summary import together

    row = {"mode": "keep", "metric": "auc", "order": "screen", "cpr": 1.0574, "cmd": 0.0688}
    row |= {"ci_low_cpr": 0.999, "ci_high_cpr": 1.138, "ci_low_cmd": 0.017, "ci_high_cmd": 0.148}
    row |= {"random_cpr_median": 0.747, "random_cpr_low": 0.667, "random_cpr_high": 0.833}
    row |= {"random_cmd_median": 0.252, "random_cmd_low": 0.166, "random_cmd_high": 0.332}
    band = pd.DataFrame([row, {**row, "order": "random"}, {**row, "mode": "remove"}])
    lines = together._faithfulness(band)
    assert lines[-1] == (
        "| screen | ROC AUC | +1.06 [+1.00, +1.14] | +0.07 [+0.02, +0.15] | 0.75 [0.67-0.83] "
        "| 0.25 [0.17-0.33] |"
    )
    assert sum(line.startswith("| screen") for line in lines) == 1  # not the random, not remove
    assert together._faithfulness(band.assign(cpr=float("nan"))) == []
