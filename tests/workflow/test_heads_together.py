"""Heads together, end to end on a tiny random Llama (2 layers x 4 heads): joint-ablation curves
under the screen, exact and random orders at the final and at every position, direct effects and
self-repair; what reruns when a seed is added; what a copied set file does."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from runs import REPO, planned_jobs, snakemake, tiny_config

from headperturb.analysis import claims, curves, stats
from headperturb.core import files


@pytest.fixture(scope="module")
def together_config(tiny_llama_dir, imdb_dir) -> dict:
    config = tiny_config(tiny_llama_dir, imdb_dir)
    config["run_name"] = "together"
    config["perturbation"]["sweeps"].append(
        {"layers": "all", "heads": "all", "kinds": ["zero"], "positions": ["last"]}
    )
    config["perturbation"]["curves"] = [
        {
            "kinds": ["zero"],
            "positions": ["last"],
            "orders": ["exact", "screen", "random"],
            "seeds": [1, 2],
            "ks": [1, 2, 8],
        },
        {
            "kinds": ["mean", "patch"],
            "positions": ["all"],
            "orders": ["screen"],
            "ks": [2, 8],
            "modes": ["remove"],
            "singles": 2,
        },
    ]
    config["screen"] = {
        "enabled": True,
        "kinds": ["zero", "mean", "patch"],
        "positions": ["all", "last"],
    }
    config["direct_effects"] = {"enabled": True, "kinds": ["zero", "mean", "patch"]}
    config["statistics"]["correction"] = "setting"
    return config


@pytest.fixture(scope="module")
def together_run(tmp_path_factory, together_config):
    workdir = tmp_path_factory.mktemp("together")
    snakemake(workdir, together_config)
    return workdir / "results" / "together"


def test_curves_and_direct_effects_are_written_and_summarised(together_run):
    for name in [
        "curves/points.parquet",
        "curves/points.csv",
        "curves/summary.csv",
        "direct_effects.parquet",
        "direct_effects.csv",
        "plots/ablation_curves.png",
        "plots/direct_vs_total.png",
        "sets/o_proj_input/last/zero/exact/ranking.parquet",
        "sets/o_proj_input/all/patch/screen/remove/k8.parquet",
        "logs/sets/o_proj_input/last/zero/random2/keep/k0.log",
    ]:
        assert (together_run / name).is_file(), name
    # every order's head scores as MIB's node-level file, in its ranking's order
    ranking = pd.read_parquet(together_run / "sets/o_proj_input/last/zero/exact/ranking.parquet")
    mib = json.loads((together_run / "curves/mib/o_proj_input/last/zero/exact.json").read_text())
    assert mib["cfg"]["n_layers"] == 2 and mib["cfg"]["n_heads"] == 4
    names = [f"a{r.layer}.h{r.head}" for r in ranking.sort_values("rank").itertuples()]
    assert list(mib["nodes"]) == names and mib["edges"] == {}
    # the curve and screen claims of docs/claims.yaml resolve in this run of the test config
    written = yaml.safe_load((REPO / "docs/claims.yaml").read_text())["claims"]
    named = [c for c in written if c["file"].startswith(("curves/", "screen/"))]
    assert {c["file"].split("/")[0] for c in named} == {"curves", "screen"}
    problems, resolved = claims.unresolved(named, together_run)
    assert not problems and resolved == len(named), problems
    text = (together_run / "summary.md").read_text()
    assert "## Heads removed together (joint-ablation curves)" in text
    assert "## Direct effects and self-repair (final position)" in text
    assert "within each setting" in text  # statistics.correction: setting


def test_each_point_is_its_members_removed_against_the_baseline(together_run):
    """Every point's members are its order's top k (or all but them), and its change of the
    correct-label logit difference is recomputed here from the per-prompt files."""
    points = files.read_parquet(together_run / "curves/points.parquet")
    base = files.read_parquet(together_run / "baseline/per_prompt.parquet").set_index("prompt_id")
    assert len(points) == 4 * (3 + 3) + 2 * (2 + 2)  # zero: 4 orders x (remove + keep); mean, patch
    for _, row in points.iterrows():
        order = row["order"]
        point = f"{row['position']}/{row['kind']}/{order}/{row['mode']}/k{row['k']}"
        path = together_run / f"sets/o_proj_input/{point}.parquet"
        frame = files.read_parquet(path)
        ranking = curves.read_ranking(path.parent.parent / "ranking.parquet")
        top = ranking[: row["k"]]
        want = {
            "remove": sorted(top),
            "keep": sorted(ranking[row["k"] :]),
            "single": [ranking[row["k"] - 1]],
        }[row["mode"]]
        members = files.read_parquet_metadata(path)["settings"]["members"]
        assert members == [f"L{lay}H{h}" for lay, h in want]
        clean = base.loc[frame["prompt_id"]]
        labels = frame["label"].to_numpy()
        change = stats.correct_logit_diff(labels, clean["margin"]) - stats.correct_logit_diff(
            labels, frame["margin"]
        )
        assert row["change_logit_diff"] == pytest.approx(change.mean(), abs=1e-9)
    every = points[(points["mode"] == "keep") & (points["k"] == 0)]
    assert (every["n_heads"] == 8).all()


def test_exact_order_follows_the_table_and_singles_give_the_interaction(together_run):
    table = files.read_parquet(together_run / "contributions.parquet")
    zero = table[(table["kind"] == "zero") & (table["position"] == "last")]
    ranking = curves.read_ranking(
        together_run / "sets/o_proj_input/last/zero/exact/ranking.parquet"
    )
    best = zero.sort_values("change_logit_diff", ascending=False, kind="stable")
    assert ranking[0] == (int(best.iloc[0]["layer"]), int(best.iloc[0]["head"]))
    points = files.read_parquet(together_run / "curves/points.parquet")
    k1 = points[
        (points["order"] == "exact") & (points["mode"] == "remove") & (points["k"] == 1)
    ].iloc[0]
    assert k1["interaction_logit_diff"] == pytest.approx(
        0.0, abs=1e-6
    )  # a set of one is its single
    assert k1["joint_change_logit_diff"] == pytest.approx(
        -float(best.iloc[0]["change_logit_diff"]), abs=1e-6
    )
    mean2 = points[
        (points["kind"] == "mean") & (points["mode"] == "remove") & (points["k"] == 2)
    ].iloc[0]
    assert np.isfinite(mean2["interaction_logit_diff"])  # from the two single set jobs


def test_direct_effects_sit_beside_the_tables_totals(together_run):
    direct = files.read_parquet(together_run / "direct_effects.parquet")
    table = files.read_parquet(together_run / "contributions.parquet")
    zero = direct[direct["kind"] == "zero"].merge(
        table[(table["kind"] == "zero") & (table["position"] == "last")], on=["layer", "head"]
    )
    assert len(zero) == 8
    np.testing.assert_allclose(zero["total_effect"], zero["change_logit_diff"], atol=1e-9)
    np.testing.assert_allclose(
        zero["self_repair"], zero["direct_effect"] - zero["total_effect"], atol=1e-12
    )
    assert direct[direct["kind"] == "mean"]["total_effect"].isna().all()  # no mean job at last
    assert direct["direct_effect"].notna().all()


def test_adding_a_seed_reruns_only_its_points(together_run, together_config):
    config = copy.deepcopy(together_config)
    config["perturbation"]["curves"][0]["seeds"] = [1, 2, 3]
    workdir = together_run.parents[1]
    assert planned_jobs(workdir, config) == {
        "rank_heads": 1,
        "mib_nodes": 1,
        "perturb_set": 6,
        "curves": 1,
        "plot": 1,
        "summarize": 1,
        "all": 1,
    }


def test_a_set_file_copied_from_another_point_is_refused(together_run, together_config, tmp_path):
    source = together_run / "sets/o_proj_input/last/zero/random1/remove/k1.parquet"
    target = together_run / "sets/o_proj_input/last/zero/random1/remove/k2.parquet"
    saved = tmp_path / "k2.parquet"
    shutil.copy2(target, saved)
    try:
        shutil.copy2(source, target)
        result = snakemake(
            together_run.parents[1], together_config, "--forcerun", "curves", check=False
        )
        assert result.returncode != 0
        assert "hold other heads or settings than their ranking" in result.stdout + result.stderr
        assert (
            str(target.relative_to(together_run.parents[1]))
            in (together_run / "stale_sets.txt").read_text()
        )
    finally:
        shutil.copy2(saved, target)
    snakemake(together_run.parents[1], together_config, "--forcerun", "curves")


def test_an_exact_order_needs_every_head_measured(together_run, together_config):
    config = copy.deepcopy(together_config)
    config["perturbation"]["curves"] = [{"kinds": ["mean"], "orders": ["exact"]}]
    result = snakemake(together_run.parents[1], config, "--dry-run", check=False)
    assert result.returncode != 0
    assert (
        "the exact order of mean at position last (o_proj_input) needs every head"
        in result.stdout + result.stderr
    )


def test_naive_sets_give_the_same_points(together_run, together_config, tmp_path):
    """Full forward passes with every member's hook give the fast points' margins (the random
    and screen orders rank the same heads whatever the method)."""
    config = copy.deepcopy(together_config)
    config["perturbation"]["method"] = "naive"
    config["perturbation"]["sweeps"] = config["perturbation"]["sweeps"][:1]
    config["perturbation"]["curves"] = [
        {"kinds": ["zero"], "positions": ["last"], "orders": ["random"], "seeds": [1], "ks": [2]},
        {
            "kinds": ["patch"],
            "positions": ["all"],
            "orders": ["screen"],
            "ks": [2],
            "modes": ["remove"],
        },
    ]
    config["direct_effects"]["enabled"] = False
    snakemake(tmp_path, config)
    for rel in [
        "sets/o_proj_input/last/zero/random1/remove/k2.parquet",
        "sets/o_proj_input/last/zero/random1/keep/k2.parquet",
        "sets/o_proj_input/all/patch/screen/remove/k2.parquet",
    ]:
        fast = pd.read_parquet(together_run / rel)
        naive = pd.read_parquet(tmp_path / "results/together" / rel)
        np.testing.assert_allclose(naive["margin"], fast["margin"], atol=1e-4)
