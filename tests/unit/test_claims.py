"""The claims check: a number holds at the precision it is written with, a label as written, a
statement about many rows through its reduction; a changed byte in the run or a wrong sentence
is found."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from headperturb.analysis import claims

pytestmark = pytest.mark.unit


@pytest.fixture
def results(tmp_path):
    (tmp_path / "baseline").mkdir()
    (tmp_path / "baseline/metrics.json").write_text(json.dumps({"accuracy": 0.775, "auc": 0.8516}))
    pd.DataFrame(
        {
            "kind": ["zero", "zero", "patch"],
            "layer": [21, 12, 21],
            "head": [1, 0, 1],
            "effect": ["bias", "none", "discrimination"],
            "change_auc": [0.0065, 0.0167, 0.2291],
            "patch_effect": [float("nan"), float("nan"), 0.409778],
        }
    ).to_csv(tmp_path / "contributions.csv", index=False)
    return tmp_path


def test_numbers_hold_at_their_written_precision():
    assert claims.agrees(0.852, 0.8516) and not claims.agrees(0.85, 0.8449)
    assert claims.agrees(0.007, 0.0065)  # half a unit of the last digit still rounds to it
    assert not claims.agrees(0.007, 0.00649)
    assert claims.agrees(41, 0.409778, scale=100) and not claims.agrees(40, 0.409778, scale=100)
    assert claims.agrees("bias", "bias") and not claims.agrees("bias", "none")
    assert claims.agrees(0.78, 0.775) and not claims.agrees("0.780", 0.775)  # a quoted last zero


def test_claims_are_checked_against_their_rows(results):
    written = [
        {"key": "acc", "file": "baseline/metrics.json", "field": "accuracy", "value": 0.775},
        {
            "key": "label",
            "file": "contributions.csv",
            "rows": {"kind": "zero", "layer": 21},
            "column": "effect",
            "value": "bias",
        },
        {
            "key": "max",
            "file": "contributions.csv",
            "rows": {"kind": "zero"},
            "column": "change_auc",
            "reduce": "max",
            "value": 0.017,
        },
        {
            "key": "share",
            "file": "contributions.csv",
            "rows": {"kind": ["patch"]},
            "column": "patch_effect",
            "scale": 100,
            "value": 41,
        },
        {
            "key": "count",
            "file": "contributions.csv",
            "rows": {"kind": "zero"},
            "reduce": "count",
            "value": 2,
        },
    ]
    assert all(f.holds for f in claims.check(written, results))
    wrong = [{**written[1], "value": "none"}, {**written[2], "reduce": "min"}]
    assert [f.holds for f in claims.check(wrong, results)] == [False, False]


def test_a_claim_that_matches_no_single_row_differs(results):
    ambiguous = {
        "key": "two rows",
        "file": "contributions.csv",
        "rows": {"kind": "zero"},
        "column": "effect",
        "value": "bias",
    }
    (finding,) = claims.check([ambiguous], results)
    assert not finding.holds and "2 rows match" in str(finding.found)


def test_the_command_exits_1_when_a_claim_differs(results, tmp_path, capsys):
    path = tmp_path / "claims.yaml"
    path.write_text(
        "claims:\n  - {key: acc, file: baseline/metrics.json, field: accuracy, value: 0.750}\n"
    )
    assert claims.main([str(path), str(results)]) == 1
    assert "DIFFERS" in capsys.readouterr().out


def test_at_least_counts_the_rows_that_reach_a_value(results):
    claim = {"key": "n", "file": "contributions.csv", "column": "change_auc", "reduce": "count"}
    assert claims.found_value({**claim, "at_least": 0.01}, results) == 2
    assert claims.found_value({**claim, "rows": {"kind": "zero"}, "at_least": 0.01}, results) == 1


def test_the_structure_of_the_claims_resolves_on_a_run_of_another_config(results, tmp_path):
    """--structure: the files this run holds must have every field, column and row key the
    claims name; files it lacks are left out; values are not compared."""
    written = [
        {"key": "a", "file": "baseline/metrics.json", "field": "accuracy", "value": 0.5},
        {
            "key": "b",
            "file": "contributions.csv",
            "rows": {"kind": "zero", "layer": 3},
            "column": "change_auc",
            "reduce": "max",
            "value": 9,
        },
        {"key": "c", "file": "curves/points.csv", "column": "auc", "value": 0.5},
    ]
    assert claims.unresolved(written, results) == ([], 2)
    renamed = [
        {**written[0], "field": "accuracy_mean"},
        {**written[1], "rows": {"kind": "zero", "ordering": 1}, "column": "auc_change"},
    ]
    problems, resolved = claims.unresolved(renamed, results)
    assert resolved == 2 and problems == [
        "a: baseline/metrics.json has no field 'accuracy_mean'",
        "b: contributions.csv has no column ordering, auc_change",
    ]
    (tmp_path / "claims.yaml").write_text(json.dumps({"claims": renamed}))
    assert claims.main(["--structure", str(tmp_path / "claims.yaml"), str(results)]) == 1
    (tmp_path / "claims.yaml").write_text(json.dumps({"claims": written}))
    assert claims.main(["--structure", str(tmp_path / "claims.yaml"), str(results)]) == 0
