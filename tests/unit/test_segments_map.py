"""The segment map (headperturb.analysis.segments) against hand-made tables."""

from __future__ import annotations

import numpy as np
import pandas as pd

from headperturb.analysis import segments


def _row(position, layer, head, change, q, kind="zero"):
    return {
        "site": "o_proj_input",
        "kind": kind,
        "scale": "",
        "layer": layer,
        "head": head,
        "position": position,
        "change_logit_diff": change,
        "ci_low_logit_diff": change - 0.1,
        "ci_high_logit_diff": change + 0.1,
        "q_value_logit_diff": q,
        "change_auc": change / 10,
    }


def _table():
    return pd.DataFrame(
        [
            _row("all", 3, 1, 0.9, 0.001),
            _row("demonstrations", 3, 1, 0.1, 0.2),
            _row("review", 3, 1, 0.5, 0.01),
            _row("last", 3, 1, -0.6, 0.001),
            _row("all", 5, 0, 0.05, 0.5),
            _row("demonstrations", 5, 0, 0.01, 0.9),
            _row("review", 5, 0, 0.02, 0.9),  # no last-position row: the sum is not defined
            _row("all", 7, 2, 1.0, 0.001),  # one position only: not mapped
            _row("last", 7, 2, 1.0, 0.001),
        ]
    )


def test_a_head_acts_where_its_change_is_significant_largest_first():
    frame = segments.segment_map(_table(), alpha=0.05)
    assert frame[["layer", "head"]].values.tolist() == [[3, 1], [5, 0]]  # largest effect first
    first = frame.iloc[0]
    assert first["acts_at"] == "last, review"  # |-0.6| > |0.5|; demonstrations has q 0.2
    assert first["segments_sum"] == 0.1 + 0.5 - 0.6
    assert first["largest"] == 0.6
    assert first["ld_all"] == 0.9 and first["low_review"] == 0.4 and first["auc_last"] == -0.06
    second = frame.iloc[1]
    assert second["acts_at"] == "none"
    assert np.isnan(second["ld_last"]) and np.isnan(second["segments_sum"])


def test_positions_inside_the_demonstrations_get_columns_of_their_own():
    """label_words and single demonstrations follow the segments, in order; they join acts_at by
    their size but not the sum of the segments (they lie inside the demonstrations)."""
    inner = [
        _row("demonstration_2", 3, 1, 0.05, 0.9),
        _row("label_words", 3, 1, 0.7, 0.001),
        _row("demonstration_10", 3, 1, 0.02, 0.9),
    ]
    frame = segments.segment_map(pd.concat([_table(), pd.DataFrame(inner)]), alpha=0.05)
    inside = ("label_words", "demonstration_2", "demonstration_10")
    assert segments.shown(frame) == (*segments.SHOWN, *inside)
    first = frame.iloc[0]
    assert first["acts_at"] == "label_words, last, review"
    assert first["segments_sum"] == 0.1 + 0.5 - 0.6 and first["largest"] == 0.6
    assert np.isnan(frame.iloc[1]["ld_label_words"])
    assert segments.shown(segments.segment_map(_table())) == segments.SHOWN


def test_counts_per_setting():
    mean = pd.DataFrame(
        [_row("review", 3, 1, 0.4, 0.01, "mean"), _row("last", 3, 1, 0.0, 1.0, "mean")]
    )
    table = pd.concat([_table(), mean])
    counted = segments.counts(segments.segment_map(table)).set_index("kind")
    columns = ["heads", "demonstrations", "review", "last", "none"]
    assert counted.loc["zero", columns].tolist() == [2, 0, 1, 1, 1]
    assert counted.loc["mean", ["heads", "review", "last", "none"]].tolist() == [1, 1, 0, 0]


def test_an_empty_table_gives_an_empty_map():
    assert segments.segment_map(_table().iloc[:0]).empty
