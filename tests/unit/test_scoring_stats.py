import math

import numpy as np
import pandas as pd
import pytest

from headperturb.analysis import scoring, stats


def test_per_prompt_margin_prediction_correct():
    frame = scoring.per_prompt(
        [7, 8, 9], [1, 0, 1], np.array([[0.0, 1.5], [2.0, -1.0], [3.0, 2.0]])
    )
    assert frame["margin"].tolist() == [1.5, -3.0, -1.0]
    assert frame["prediction"].tolist() == [1, 0, 0]
    assert frame["correct"].tolist() == [True, True, False]


def test_nan_logits_name_the_prompts():
    with pytest.raises(scoring.NumericsError, match=r"prompt id\(s\) \[8\]"):
        scoring.per_prompt([7, 8], [1, 0], np.array([[0.0, 1.0], [np.nan, 0.0]]))


def test_metrics_by_hand():
    # labels 1,1,0,0 ; predictions 1,0,0,0 -> acc 3/4
    # class 1: P=1, R=1/2, F1=2/3; class 0: P=2/3, R=1, F1=4/5; macro = (2/3+4/5)/2 = 11/15
    m = scoring.metrics([1, 1, 0, 0], [1, 0, 0, 0])
    assert m["accuracy"] == 0.75
    assert m["f1"] == pytest.approx(11 / 15)
    # class 1 never predicted: its F1 is 0; class 0: P=2/3, R=1, F1=4/5; macro = (0 + 4/5)/2
    assert scoring.metrics([1, 0, 0], [0, 0, 0])["f1"] == pytest.approx(0.4)


def test_contribution_and_relative_change():
    assert stats.contribution(0.8, 0.7) == pytest.approx(0.1)
    assert stats.relative_change(0.8, 0.7) == pytest.approx(12.5)
    assert stats.relative_change(0.8, np.array([0.84, 0.8])) == pytest.approx([-5.0, 0.0])
    assert math.isnan(stats.relative_change(0.0, 0.1))


@pytest.mark.parametrize(
    "relative, expected",
    [
        (10.01, "HIGH"),
        (-12, "HIGH"),
        (10.0, "MEDIUM"),
        (-7, "MEDIUM"),
        (5.0, "MEDIUM"),
        (4.99, "LOW"),
        (0, "LOW"),
    ],
)
def test_impact_category_boundaries(relative, expected):
    assert stats.impact_category(relative, high=10, medium=5) == expected


def test_direction():
    assert [stats.direction(x) for x in (0.01, -0.01, 0.0)] == ["beneficial", "harmful", "neutral"]


def test_aggregate_table():
    perturbed = pd.DataFrame(
        {
            "site": ["o_proj_input"] * 3,
            "position": ["all"] * 3,
            "kind": ["noise"] * 3,
            "layer": [1, 0, 1],
            "head": [0, 0, 1],
            "scale": ["2", "2", "10"],
            "baseline_accuracy": [0.8, 0.8, 0.5],  # each row's own prompts
            "contribution_accuracy": [0.1, 0.0, -0.025],
            "baseline_f1": [0.8, 0.8, 0.8],
            "contribution_f1": [0.3, 0.0, 0.0],
        }
    )
    table = stats.aggregate(perturbed, high=10, medium=5)
    assert table[["layer", "head", "scale"]].values.tolist() == [
        [0, 0, "2"],
        [1, 0, "2"],
        [1, 1, "10"],
    ]
    assert table["relative_change_accuracy"].tolist() == pytest.approx([0.0, 12.5, -5.0])
    assert table["relative_change_f1"].tolist() == pytest.approx([0.0, 37.5, 0.0])
    assert table["direction"].tolist() == ["neutral", "beneficial", "harmful"]
    assert table["impact"].tolist() == ["LOW", "HIGH", "MEDIUM"]
    assert stats.category_counts(table) == {"HIGH": 1, "MEDIUM": 1, "LOW": 1}
