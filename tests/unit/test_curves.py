"""Joint-ablation curves, direct effects and the correction's family: the set jobs a config asks
for, the orders, the curves' summaries, the interaction and self-repair, against hand
computations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from headperturb.analysis import aggregation, curves, repair, stats
from headperturb.core import checks, config, sets
from headperturb.core.sets import SetJob
from headperturb.core.spec import SpecError


def _curve(**kw):
    return sets.curves({"curves": [kw]})[0]


def test_set_jobs_cover_the_grid_modes_orders_and_singles():
    jobs = sets.set_jobs([_curve(kinds=["zero"], seeds=[1, 2], singles=3)], 10)
    screen = [j for j in jobs if j.order == "screen"]
    assert sorted(j.k for j in screen if j.mode == "remove") == [1, 2, 4, 8, 10]
    assert sorted(j.k for j in screen if j.mode == "keep") == [0, 1, 2, 4, 8]
    assert sorted(j.k for j in screen if j.mode == "single") == [1, 2, 3]
    randoms = [j for j in jobs if j.order == "random"]
    assert {j.seed for j in randoms} == {1, 2} and not any(j.mode == "single" for j in randoms)
    assert len(jobs) == 10 + 3 + 2 * 10
    assert {j.position for j in jobs} == {"last"} and {j.site for j in jobs} == {"o_proj_input"}
    # a setting the run measures head by head needs no single set jobs
    measured = sets.set_jobs(
        [_curve(kinds=["zero"], singles=3)], 10, {("o_proj_input", "last", "zero")}
    )
    assert not any(j.mode == "single" for j in measured)


def test_ks_mib_adds_mibs_sizes_and_the_default_grid_is_unchanged():
    default = sets.set_jobs([_curve(kinds=["zero"], orders=["screen"])], 270)
    keep = sorted(j.k for j in default if j.mode == "keep")
    assert keep == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert sorted(j.k for j in default if j.mode == "remove") == [*keep[1:], 270]
    mib = sets.set_jobs([_curve(kinds=["zero"], orders=["screen"], ks="mib")], 270)
    keep = sorted(j.k for j in mib if j.mode == "keep")
    assert keep == [0, 1, 2, 4, 5, 8, 13, 16, 27, 32, 54, 64, 128, 135, 256]
    assert set(default) < set(mib)  # the default grid's jobs stay, MIB's sizes join them
    with pytest.raises(
        SpecError, match="ks 'half' is not allowed; allowed: a list of k, null, mib"
    ):
        sets.set_jobs([_curve(kinds=["zero"], ks="half")], 10)


def test_set_jobs_refuse_what_cannot_be_a_set():
    with pytest.raises(SpecError, match="kind 'noise' is not allowed; allowed: zero, mean, patch"):
        sets.set_jobs([_curve(kinds=["noise"])], 10)
    with pytest.raises(SpecError, match=r"ks \[1, 12\] must lie in 1..10"):
        sets.set_jobs([_curve(kinds=["zero"], ks=[1, 12])], 10)


def test_members_of_remove_keep_and_single():
    ranking = [(3, 1), (0, 2), (5, 0), (1, 1)]
    job = SetJob("o_proj_input", "last", "zero", "screen", 0, "remove", 2)
    assert job.members(ranking) == [(0, 2), (3, 1)]
    keep = SetJob("o_proj_input", "last", "zero", "screen", 0, "keep", 1)
    assert keep.members(ranking) == [(0, 2), (1, 1), (5, 0)]
    single = SetJob("o_proj_input", "last", "zero", "screen", 0, "single", 3)
    assert single.members(ranking) == [(5, 0)]


def test_set_paths_round_trip_through_wildcards():
    job = SetJob("o_proj_input", "all", "mean", "random", 2, "keep", 16)
    assert job.path("results/r") == "results/r/sets/o_proj_input/all/mean/random2/keep/k16.parquet"
    ranking = "results/r/sets/o_proj_input/all/mean/random2/ranking.parquet"
    assert job.ranking("results/r") == ranking
    assert SetJob.from_wildcards("o_proj_input", "all", "mean", "random2", "keep", "16") == job
    assert sets.parse_order("screen") == ("screen", 0)
    for bad in ("random", "screen1", "best"):
        with pytest.raises(SpecError, match="allowed: screen, exact, random<seed>"):
            sets.parse_order(bad)


def test_curve_defaults_are_the_schemas(tmp_path):
    from pathlib import Path

    schema = config.load_schema(Path(__file__).parents[2] / "workflow/schemas/config.schema.yaml")
    item = schema["properties"]["perturbation"]["properties"]["curves"]["items"]["properties"]
    assert {k: v["default"] for k, v in item.items() if "default" in v} == sets.CURVE_DEFAULTS


def test_a_screen_ordered_curve_needs_the_screens_estimate():
    screen = {"kinds": ["zero", "noise"], "positions": ["all"]}
    with pytest.raises(SpecError, match="add mean to screen.kinds and last to screen.positions"):
        checks.check_curves([_curve(kinds=["mean"])], screen)
    checks.check_curves([_curve(kinds=["mean"], orders=["random"])], screen)  # no screen needed


ZERO_LAST = curves.Setting(site="o_proj_input", position="last", kind="zero")
MEAN_LAST = curves.Setting(site="o_proj_input", position="last", kind="mean")


def test_rankings_of_each_order():
    heads = pd.DataFrame(
        {
            "kind": "zero",
            "position": "last",
            "layer": [0, 0, 1, 1],
            "head": [0, 1, 0, 1],
            "est_logit_diff": [0.1, -0.3, 0.5, 0.1],
        }
    )
    ranked = curves.ranking("screen", ZERO_LAST, 2, 2, screen_heads=heads)
    assert list(zip(ranked["layer"], ranked["head"])) == [(1, 0), (0, 0), (1, 1), (0, 1)]
    assert ranked["rank"].tolist() == [1, 2, 3, 4]
    with pytest.raises(curves.RankingError, match="add mean to screen.kinds"):
        curves.ranking("screen", MEAN_LAST, 2, 2, screen_heads=heads)
    table = pd.DataFrame(
        {
            "site": "o_proj_input",
            "position": "last",
            "kind": "zero",
            "layer": [0, 0, 1],
            "head": [0, 1, 0],
            "change_logit_diff": [1.0, 2.0, 3.0],
        }
    )
    with pytest.raises(curves.RankingError, match="1 of 4 are not"):
        curves.ranking("exact", ZERO_LAST, 2, 2, table=table)
    table.loc[3] = ["o_proj_input", "last", "zero", 1, 1, -1.0]
    exact = curves.ranking("exact", ZERO_LAST, 2, 2, table=table)
    assert list(zip(exact["layer"], exact["head"])) == [(1, 0), (0, 1), (0, 0), (1, 1)]
    a, b = (curves.ranking("random", ZERO_LAST, 4, 3, seed=s) for s in (1, 2))
    again = curves.ranking("random", ZERO_LAST, 4, 3, seed=1)
    assert a.equals(again) and not a.equals(b)
    assert sorted(zip(a["layer"], a["head"])) == [(lay, h) for lay in range(4) for h in range(3)]


def _points(mode, ks, shares, order="screen"):
    """A curve's points: the retained shares, and metrics that give them (baseline logit
    difference 2 above chance 0, AUC 1 above chance 0.5)."""
    shares = np.asarray(shares, dtype=float)
    return pd.DataFrame(
        {
            "site": "o_proj_input",
            "position": "last",
            "kind": "zero",
            "order": order,
            "seed": 0,
            "mode": mode,
            "k": ks,
            "retained_logit_diff": shares,
            "retained_auc": shares,
            "baseline_logit_diff": 2.0,
            "logit_diff": 2.0 * shares,
            "baseline_auc": 1.0,
            "auc": 0.5 + 0.5 * shares,
        }
    )


def test_curve_summary_by_hand():
    """N = 8. remove: shares 0.9, 0.6, 0.4, 0 at k = 1, 2, 4, 8, anchored at 1 for k = 0: area
    0.11875 + 0.09375 + 0.125 + 0.1 = 0.4375, half lost at k = 4. keep: 0, 0.3, 0.55, 0.8 at
    k = 0, 1, 2, 4, anchored at 1 for k = 8: area 0.01875 + 0.053125 + 0.16875 + 0.45 = 0.690625,
    half kept at k = 2."""
    points = pd.concat(
        [
            _points("remove", [1, 2, 4, 8], [0.9, 0.6, 0.4, 0.0]),
            _points("keep", [0, 1, 2, 4], [0.0, 0.3, 0.55, 0.8]),
        ]
    )
    out = curves.summarize(points, 8).set_index(["mode", "metric"])
    assert out.loc[("remove", "logit_diff"), "area"] == pytest.approx(0.4375)
    assert out.loc[("remove", "logit_diff"), "k_half"] == 4
    assert out.loc[("keep", "auc"), "area"] == pytest.approx(0.690625)
    assert out.loc[("keep", "auc"), "k_half"] == 2
    never = curves.summarize(_points("remove", [1, 8], [0.9, 0.7]), 8)
    assert never["k_half"].isna().all()  # no k of the grid loses half
    # MIB's areas, keep curves only. N = 8: 0.1 %-10 % are k = 0 (f = 0), 20 % k = 1, 50 % k = 4,
    # 100 % k = 8; f = the share here (every head ablated retains 0): 0.3, 0.8, 1. CPR over the
    # fraction 0.1 * 0.3 / 2 + 0.3 * 1.1 / 2 + 0.5 * 1.8 / 2 = 0.63; CMD 0.099 + 0.1 * 1.7 / 2 +
    # 0.3 * 0.9 / 2 + 0.5 * 0.2 / 2 = 0.369 (CPR + CMD = 0.999 where 0 <= f <= 1)
    assert out.loc[("remove", "auc"), ["mib_sizes", "cpr", "cmd"]].isna().all()
    assert out.loc[("keep", "auc"), "mib_sizes"] == 10
    assert out.loc[("keep", "auc"), "cpr"] == pytest.approx(0.63)
    assert out.loc[("keep", "logit_diff"), "cmd"] == pytest.approx(0.369)
    gappy = curves.summarize(_points("keep", [0, 1, 2], [0.0, 0.3, 0.55]), 8).iloc[0]
    assert gappy["mib_sizes"] == 9 and np.isnan(gappy["cpr"])  # k = 4 not measured: no area


def test_the_random_band_beside_a_ranked_order():
    points = pd.concat(
        [
            _points("remove", [1, 2, 4, 8], [0.9, 0.6, 0.4, 0.0]),
            _points("remove", [1, 2, 4, 8], [1.0, 0.9, 0.8, 0.0], "random1"),
            _points("remove", [1, 2, 4, 8], [1.0, 0.95, 0.45, 0.0], "random2"),
        ]
    )
    band = curves.control_band(curves.summarize(points, 8))
    ld = band[band["metric"] == "logit_diff"].set_index("order")
    assert ld.loc["screen", "k_half"] == 4 and ld.loc["random", "k_half"] == 6  # median of 8, 4
    assert ld.loc["screen", "random_k_half_low"] == 4
    assert ld.loc["screen", "random_k_half_high"] == 8
    assert ld.loc["screen", "random_seeds"] == 2
    assert ld["random_cpr_median"].isna().all() and ld["cmd"].isna().all()  # remove: no MIB


def _keep_everywhere(shares, order):
    """A keep curve of a 1000-head model at k = 0 and every one of MIB's sizes."""
    return _points("keep", [0, 1, 2, 5, 10, 20, 50, 100, 200, 500], shares, order)


def test_the_random_band_of_mibs_areas():
    """Shares s at MIB's sizes are f = s (the empty circuit retains 0 here). f = 1 from 0.1 %:
    CPR 0.999, CMD 0 (log: 1, 0); random1 f = 0 up to 50 %: CPR (0.5 * 1) / 2 = 0.25 over the
    fraction, CMD 0.999 - 0.25 = 0.749; random2 f = 1/2 below 100 %: CPR 0.499 * 0.5 + 0.5 *
    0.75 = 0.6245."""
    points = pd.concat(
        [
            _keep_everywhere([0.0, *[1.0] * 9], "screen"),
            _keep_everywhere([0.0] * 10, "random1"),
            _keep_everywhere([0.0, *[0.5] * 9], "random2"),
        ]
    )
    band = curves.control_band(curves.summarize(points, 1000))
    ld = band[band["metric"] == "logit_diff"].set_index("order")
    assert ld.loc["screen", "mib_sizes"] == 10
    assert ld.loc["screen", "cpr"] == pytest.approx(0.999)
    assert ld.loc["screen", "cmd"] == pytest.approx(0.0)
    assert ld.loc["screen", "cpr_log"] == pytest.approx(1.0)
    assert ld.loc["screen", "random_cpr_low"] == pytest.approx(0.25)
    assert ld.loc["screen", "random_cpr_high"] == pytest.approx(0.6245)
    assert ld.loc["screen", "random_cmd_high"] == pytest.approx(0.749)
    assert ld.loc["random", "cpr"] == pytest.approx((0.25 + 0.6245) / 2)  # the median of two
    assert np.isnan(ld.loc["random", "ci_low_cpr"])
    assert np.isnan(ld.loc["screen", "ci_low_cpr"])  # no per-prompt files given: no interval


def test_interaction_by_hand():
    """Contributions (baseline - perturbed) 3 jointly, 1 and 0.5 alone on every prompt: joint change
    -3, singles' -1.5, interaction -1.5 (they back each other up)."""
    index = [10, 11, 12]
    out = curves.interaction(
        pd.Series([3.0, 3.0, 3.0], index),
        [pd.Series([1.0, 1.0, 1.0], index), pd.Series([0.5, 0.5, 0.5, 9.0], [*index, 99])],
    )
    assert out["joint_change_logit_diff"] == pytest.approx(-3.0)
    assert out["singles_change_logit_diff"] == pytest.approx(-1.5)
    assert out["interaction_logit_diff"] == pytest.approx(-1.5)
    assert out["ci_low_interaction_logit_diff"] == pytest.approx(-1.5)
    assert out["ci_high_interaction_logit_diff"] == pytest.approx(-1.5)


def test_retained_share_is_undefined_below_chance():
    base = pd.DataFrame(
        {
            "prompt_id": [1, 2, 3, 4],
            "label": [1, 0, 1, 0],
            "margin": [2.0, -1.0, 1.0, -3.0],
            "calibrated_margin": [2.0, -1.0, 1.0, -3.0],
            "prediction": [1, 0, 1, 0],
        }
    )
    frame = base.assign(
        site="o_proj_input",
        position="last",
        kind="zero",
        order="screen",
        seed=0,
        mode="remove",
        k=2,
        n_heads=2,
        draw=0,
        margin=[1.0, -0.5, 0.5, -1.5],
    )
    frame["calibrated_margin"] = frame["margin"]
    row = curves.point_row(frame, base, n_boot=50, n_perm=50)
    assert row["baseline_logit_diff"] == pytest.approx(1.75)
    assert row["logit_diff"] == pytest.approx(0.875)
    assert row["retained_logit_diff"] == pytest.approx(0.5)
    assert row["retained_auc"] == pytest.approx(1.0)
    assert row["retained_accuracy"] == pytest.approx(1.0)
    worse = base.assign(
        margin=-base["margin"], calibrated_margin=-base["margin"], prediction=[0, 1, 0, 1]
    )
    row = curves.point_row(frame, worse, n_boot=50, n_perm=50)
    assert np.isnan(row["retained_logit_diff"]) and np.isnan(row["retained_auc"])


def test_self_repair_is_direct_minus_total_by_hand():
    direct = np.array([[[1.0, 0.0]], [[3.0, 0.0]]])  # (prompts, layers, heads)
    totals = {("zero", 0, 0): pd.Series([0.5, 1.5], index=[7, 8])}
    out = repair.table({"zero": direct}, [7, 8], totals, n_boot=100).set_index("head")
    assert out.loc[0, "direct_effect"] == pytest.approx(2.0)
    assert out.loc[0, "total_effect"] == pytest.approx(1.0)
    assert out.loc[0, "self_repair"] == pytest.approx(1.0)
    assert out.loc[0, "ci_low_self_repair"] == pytest.approx(0.5)  # bootstrap of (0.5, 1.5)
    assert out.loc[0, "ci_high_self_repair"] == pytest.approx(1.5)
    assert np.isnan(out.loc[1, "total_effect"]) and np.isnan(out.loc[1, "self_repair"])
    contributions = repair.direct_contributions(np.array([[[0.5]], [[0.5]]]), [1, 0])
    assert contributions.ravel().tolist() == [-0.5, 0.5]  # baseline - ablated, signed by label


def test_correction_within_each_setting_by_hand():
    table = pd.DataFrame(
        {
            "site": "o_proj_input",
            "position": "last",
            "kind": ["zero", "zero", "mean", "mean"],
            "scale": "",
            "p": [0.01, 0.04, 0.03, 0.5],
        }
    )
    run = aggregation.qvalues(table, "p", "run")
    np.testing.assert_allclose(run, stats.bh_qvalues(table["p"]))
    within = aggregation.qvalues(table, "p", "setting")
    np.testing.assert_allclose(within, [0.02, 0.04, 0.06, 0.5])  # each pair corrected alone
    # the default family: the rows of another setting added beside leave these q-values alone
    alone = aggregation.qvalues(table.iloc[:2], "p")
    np.testing.assert_allclose(aggregation.qvalues(table, "p")[:2], alone)
    assert not np.allclose(aggregation.qvalues(table, "p", "run")[:2], alone)
    with pytest.raises(ValueError, match="allowed: run, setting"):
        aggregation.qvalues(table, "p", "layer")
