"""Intervals, paired tests and q-values against hand computations."""

import numpy as np
import pytest

from headperturb.analysis import stats


def test_bh_qvalues_by_hand():
    # p sorted: 0.01, 0.02, 0.03, 0.5 (m = 4): p*m/rank = 0.04, 0.04, 0.04, 0.5;
    # monotone from the top
    q = stats.bh_qvalues([0.03, 0.5, 0.01, 0.02])
    assert q.tolist() == pytest.approx([0.04, 0.5, 0.04, 0.04])
    # a later smaller ratio pulls earlier ones down: p = 0.01, 0.04 -> 0.02, 0.04
    assert stats.bh_qvalues([0.04, 0.01]).tolist() == pytest.approx([0.04, 0.02])
    assert stats.bh_qvalues([0.9, 0.95]).max() <= 1.0
    q = stats.bh_qvalues([np.nan, 0.01])
    assert np.isnan(q[0]) and q[1] == pytest.approx(0.01)


def test_sign_flip_exact_by_hand():
    # d = (1, 1, 1): of the 8 sign patterns only +++ and --- reach |mean| 1 -> p = 2/8
    assert stats.sign_flip_pvalue([1, 1, 1]) == pytest.approx(0.25)
    # d = (2, 1): |mean| >= 1.5 for ++ and -- only -> 2/4
    assert stats.sign_flip_pvalue([2, 1]) == pytest.approx(0.5)
    assert stats.sign_flip_pvalue([0, 0]) == 1.0
    # 30 equal differences: only the all-plus and all-minus patterns reach |mean| 1, p = 2 / 2**30,
    # exact although 2**30 patterns are more than n_perm (a Monte Carlo floor would be 1e-3)
    assert stats.sign_flip_pvalue(np.ones(30), n_perm=999) == pytest.approx(2 / 2**30, rel=1e-9)
    # differences off any lattice: Monte Carlo, observed pattern counted, p = 1 / (1 + n_perm)
    off = np.random.default_rng(0).normal(1.0, 0.1, 30) * np.sqrt(2)
    assert stats.sign_flip_pvalue(off, n_perm=999) == pytest.approx(1e-3)


def test_lattice_pvalue_equals_every_sign_pattern_and_the_binomial():
    """Changes of correctness averaged over 5 draws (multiples of 0.2): the convolution gives
    what enumerating all 2**12 sign patterns gives; for +-1 differences it is the two-sided
    binomial (McNemar's exact test): 9 of 10 discordant prompts one way, p = 2 x 11/1024."""
    rng = np.random.default_rng(1)
    d = rng.integers(-5, 6, 12) / 5
    d = d[d != 0]
    signs = ((np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1) * 2 - 1
    by_pattern = float((np.abs(signs @ d) >= abs(d.sum()) - 1e-9).mean())
    assert stats.lattice_pvalue(d) == pytest.approx(by_pattern, rel=1e-12)
    assert stats.sign_flip_pvalue([1] * 9 + [-1]) == pytest.approx(2 * 11 / 1024)
    assert stats.lattice_pvalue([0.5, np.pi]) is None


def test_correct_label_logit_difference_and_probability():
    assert stats.correct_logit_diff([1, 0], [2.0, 2.0]).tolist() == [2.0, -2.0]
    assert stats.correct_probability([1], [0.0])[0] == pytest.approx(0.5)


def _fake(n=100, draws=4, flip=0, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n // 2)
    margin = np.where(labels == 1, 1.0, -1.0) + rng.normal(0, 0.1, n)
    base_pred = (margin > 0).astype(int)
    pert_margin = np.repeat(margin[:, None], draws, axis=1)
    pert_margin[:flip] *= -1  # the first `flip` prompts become wrong in every draw
    return labels, (base_pred, margin), ((pert_margin > 0).astype(int), pert_margin)


def test_no_change_gives_zero_and_p_one():
    out = stats.paired_summary(*_fake(), n_boot=300, n_perm=500)
    for metric in ("accuracy", "f1", "logit_diff", "probability"):
        assert out[f"change_{metric}"] == pytest.approx(0.0)
        assert out[f"ci_low_{metric}"] == pytest.approx(0.0)
        assert out[f"ci_high_{metric}"] == pytest.approx(0.0)
    assert out["p_value"] == 1.0


def test_a_real_drop_is_detected_with_an_interval_around_it():
    out = stats.paired_summary(*_fake(flip=20), n_boot=1000, n_perm=2000)
    assert out["change_accuracy"] == pytest.approx(0.20)
    assert out["ci_low_accuracy"] < 0.20 < out["ci_high_accuracy"]
    assert out["ci_low_accuracy"] > 0.1 and out["ci_high_accuracy"] < 0.3
    assert out["p_value"] < 0.001 and out["p_value_logit_diff"] < 0.001
    assert out["change_logit_diff"] > 0 and out["change_f1"] > 0.15


def test_category_stability():
    assert stats.category_stability([(12.0, 15.0), (12.0, 4.0), (np.nan, 1.0)], 10, 5) == [
        True,
        False,
        None,
    ]


def test_stability_is_kept_apart_for_ablations_of_one_head(tmp_path):
    """mean (one draw) and resample (two draws) of the same head share site, layer, head and an
    empty scale; each row must get its own stability."""
    import pandas as pd

    from headperturb.analysis import aggregation, scoring
    from headperturb.core import files

    labels = np.array([0, 1, 0, 1])
    base = scoring.per_prompt(range(4), labels, np.array([[1.0, 0], [0, 1], [1, 0], [0, 1]]))
    files.write_parquet(tmp_path / "base.parquet", base)
    files.write_json(tmp_path / "metrics.json", scoring.metrics(labels, base["prediction"]))
    paths = []
    for kind, draws in (("mean", 1), ("resample", 2)):
        frames = [base.assign(draw=d) for d in range(draws)]
        frame = pd.concat(frames).assign(
            site="o_proj_input",
            position="all",
            kind=kind,
            layer=0,
            head=0,
            scale="",
            noise_mode="",
            sigma=float("nan"),
        )
        files.write_parquet(tmp_path / f"{kind}.parquet", frame)
        paths.append(tmp_path / f"{kind}.parquet")
    files_of = {
        "baseline": tmp_path / "metrics.json",
        "baseline_per_prompt": tmp_path / "base.parquet",
        "perturbed": paths,
        "parquet": tmp_path / "t.parquet",
        "csv": tmp_path / "t.csv",
    }
    statistics = {"bootstrap": 100, "permutations": 100}
    table = aggregation.aggregate(files_of, high=10.0, medium=5.0, statistics=statistics)
    stable = dict(zip(table["kind"], table["category_stable"]))
    assert stable["mean"] is None and stable["resample"] is True


def test_a_registered_metric_reaches_the_table_and_the_figures(tmp_path, monkeypatch):
    """A new metric is one entry in scoring.METRICS: the table then carries it with its
    contribution and interval, and the figures draw it."""
    import pandas as pd

    from headperturb.analysis import aggregation, figures, scoring
    from headperturb.core import files

    def error_rate(weights, labels, preds):
        return 1 - scoring.METRICS["accuracy"].compute(weights, labels, preds)

    monkeypatch.setitem(scoring.METRICS, "error_rate", scoring.Metric("error rate", error_rate))
    labels = np.array([0, 1, 0, 1, 0, 1])
    base = scoring.per_prompt(
        range(6), labels, np.array([[1.0, 0], [0, 1], [1, 0], [0, 1], [0, 1], [0, 1]])
    )
    files.write_parquet(tmp_path / "base.parquet", base)
    files.write_json(tmp_path / "metrics.json", scoring.metrics(labels, base["prediction"]))
    flipped = scoring.per_prompt(
        range(6), labels, np.array([[0, 1.0], [0, 1], [1, 0], [1, 0], [0, 1], [0, 1]])
    )
    frame = flipped.assign(
        draw=0,
        site="o_proj_input",
        position="all",
        kind="zero",
        layer=0,
        head=0,
        scale="",
        noise_mode="",
        sigma=float("nan"),
    )
    files.write_parquet(tmp_path / "zero.parquet", frame)
    paths = {
        "baseline": tmp_path / "metrics.json",
        "baseline_per_prompt": tmp_path / "base.parquet",
        "perturbed": [tmp_path / "zero.parquet"],
        "parquet": tmp_path / "t.parquet",
        "csv": tmp_path / "t.csv",
    }
    statistics = {"bootstrap": 100, "permutations": 100}
    table = aggregation.aggregate(paths, high=10.0, medium=5.0, statistics=statistics)
    row = table.iloc[0]
    assert row["baseline_error_rate"] == pytest.approx(1 / 6)
    assert row["error_rate"] == pytest.approx(3 / 6)
    assert row["contribution_error_rate"] == pytest.approx(-2 / 6)
    assert {"ci_low_error_rate", "ci_high_error_rate"} <= set(table.columns)
    assert "error_rate" in figures.detail() and figures.metric_names()["error_rate"] == "error rate"
    for name in ("contribution_distributions", "detailed_head_analysis"):
        figures.plot(name, tmp_path / "t.parquet", tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    del pd
