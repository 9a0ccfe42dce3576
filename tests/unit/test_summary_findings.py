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
