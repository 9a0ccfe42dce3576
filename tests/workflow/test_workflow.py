"""The whole Snakemake workflow on a tiny random Llama: outputs, numbers, incremental reruns,
lint."""

from __future__ import annotations

import copy
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from runs import REPO, launch, planned_jobs, snakemake, tiny_config

from headperturb.analysis import claims, scoring
from headperturb.core import files


@pytest.fixture(scope="module")
def base_config(tiny_llama_dir, imdb_dir) -> dict:
    return tiny_config(tiny_llama_dir, imdb_dir)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, base_config) -> Path:
    workdir = tmp_path_factory.mktemp("workflow")
    snakemake(workdir, base_config)
    return workdir


JOB_FILES = [
    "perturb/o_proj_input/all/noise_scale2/layer1/head0.parquet",
    "perturb/o_proj_input/all/noise_scale2/layer1/head1.parquet",
    "perturb/o_proj_input/all/zero/layer1/head0.parquet",
    "perturb/o_proj_input/all/mean/layer1/head1.parquet",
    "perturb/o_proj_input/last/noise_scale2/layer0/head0.parquet",
    "perturb/o_proj_input/last/zero/layer0/head1.parquet",
    "perturb/o_proj_input/all/patch/layer1/head0.parquet",
    "perturb/o_proj_input/last/restore/layer0/head1.parquet",
]


def test_outputs_exist_and_no_temporary_files_remain(finished_run):
    results = finished_run / "results" / "test"
    for name in [
        "prompts/reviews.parquet",
        "prompts/prompts.parquet",
        "prompts/demonstrations.parquet",
        "prompts/selection.csv",
        "baseline/per_prompt.parquet",
        "baseline/metrics.json",
        "baseline/final_state.safetensors",
        "baseline/last_layer/program.pt2",
        "activations/cache.safetensors",
        *JOB_FILES,
        "contributions.parquet",
        "contributions.csv",
        "summary.md",
        "plots/contribution_distributions.png",
        "plots/detailed_head_analysis.png",
        "plots/layer_head_heatmap.png",
        "logs/select_reviews.log",
        "logs/baseline.log",
        "logs/perturb/o_proj_input/all/noise_scale2/layer1/head0.log",
        "logs/aggregate.log",
    ]:
        assert (results / name).is_file(), name
    assert (results / "plots/detailed_head_analysis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    leftovers = [p for p in finished_run.rglob("*.tmp") if ".snakemake" not in p.parts]
    assert leftovers == []
    assert (
        "accuracy per draw"
        in (results / "logs/perturb/o_proj_input/last/zero/layer0/head1.log").read_text()
    )


def test_table_is_baseline_minus_perturbed_from_the_per_prompt_files(finished_run):
    results = finished_run / "results" / "test"
    base = pd.read_parquet(results / "baseline/per_prompt.parquet")
    base_metrics = scoring.metrics(base["label"], base["prediction"])
    assert files.read_json(results / "baseline/metrics.json")["accuracy"] == pytest.approx(
        base_metrics["accuracy"]
    )
    table = pd.read_parquet(results / "contributions.parquet")
    assert len(table) == 14 and set(table["head"]) == {0, 1} and set(table["layer"]) == {0, 1}
    assert sorted(table["kind"].unique()) == ["mean", "noise", "patch", "restore", "zero"]
    assert set(zip(table["position"], table["layer"])) == {("all", 1), ("last", 0)}
    for _, row in table[table["kind"] == "noise"].iterrows():
        head = f"layer{row['layer']}/head{row['head']}"
        per_prompt = pd.read_parquet(
            results / f"perturb/o_proj_input/{row['position']}/noise_scale2/{head}.parquet"
        )
        assert sorted(per_prompt["draw"].unique()) == [0, 1]
        assert set(per_prompt.columns) >= {
            "site",
            "position",
            "layer",
            "head",
            "scale",
            "seed",
            "draw",
            "margin",
            "calibrated_margin",
            "correct",
        }
        accs = [g["correct"].mean() for _, g in per_prompt.groupby("draw")]
        expected = base_metrics["accuracy"] - sum(accs) / len(accs)
        assert row["contribution_accuracy"] == pytest.approx(expected)
        assert row["relative_change_accuracy"] == pytest.approx(
            100 * expected / base_metrics["accuracy"]
        )
    csv = pd.read_csv(results / "contributions.csv")
    assert list(csv.columns) == list(table.columns)
    meta = files.read_parquet_metadata(results / JOB_FILES[0])
    assert meta["model_architecture"] == "LlamaForCausalLM" and meta["device"] == "cpu"


def test_two_runs_give_byte_identical_files(tmp_path, finished_run, base_config):
    """Determinism: a fresh run of the same config in another folder writes the same bytes,
    every file under results/<run>/ but the logs (which hold times)."""
    snakemake(tmp_path, base_config)
    ours = sorted(
        p
        for p in (tmp_path / "results/test").rglob("*")
        if p.is_file() and "logs" not in p.relative_to(tmp_path).parts
    )
    assert len(ours) >= 20
    assert any(p.name == "program.pt2" for p in ours) and any(p.suffix == ".png" for p in ours)
    for path in ours:
        theirs = finished_run / path.relative_to(tmp_path)
        assert path.read_bytes() == theirs.read_bytes(), path.relative_to(tmp_path)


def test_nothing_to_do_on_a_second_run(finished_run, base_config):
    assert planned_jobs(finished_run, base_config) == {}


AFTER_THE_JOBS = {"aggregate": 1, "summarize": 1, "plot": 3, "all": 1}


def test_adding_a_head_reruns_only_its_jobs_aggregation_and_plots(finished_run, base_config):
    config = copy.deepcopy(base_config)
    config["perturbation"]["heads"] = [0, 1, 2]
    assert planned_jobs(finished_run, config) == {"perturb_head": 7, **AFTER_THE_JOBS}


def test_adding_a_scale_adds_its_jobs_and_the_scale_plot(finished_run, base_config):
    config = copy.deepcopy(base_config)
    config["perturbation"]["scales"] = [2.0, 8.0]
    assert planned_jobs(finished_run, config) == {"perturb_head": 4, **AFTER_THE_JOBS, "plot": 4}


def test_adding_an_all_position_sweep_of_another_layer_captures_its_inputs(
    finished_run, base_config
):
    config = copy.deepcopy(base_config)
    config["perturbation"]["sweeps"].append(
        {"layers": [0], "positions": ["all"], "kinds": ["noise"]}
    )
    assert planned_jobs(finished_run, config) == {
        "capture_layer": 1,
        "perturb_head": 2,
        **AFTER_THE_JOBS,
    }


def test_adding_a_position_adds_only_its_jobs(finished_run, base_config):
    config = copy.deepcopy(base_config)
    config["perturbation"]["sweeps"][0]["positions"] = ["all", "last"]
    assert planned_jobs(finished_run, config) == {"perturb_head": 8, **AFTER_THE_JOBS}


def test_naive_method_gives_the_same_numbers(finished_run, base_config):
    """The reference method (full forward passes) through the whole workflow, for every pass of
    the fast method (the last layer, a middle layer at all positions and at the last one), with
    relative noise."""
    fast_config = copy.deepcopy(base_config)
    fast_config["perturbation"]["noise_mode"] = "relative"
    fast_config["perturbation"]["sweeps"].append({"layers": [0], "positions": ["all"]})
    naive_config = copy.deepcopy(fast_config)
    naive_config["run_name"] = "test-naive"
    naive_config["perturbation"]["method"] = "naive"
    snakemake(finished_run, fast_config)
    snakemake(finished_run, naive_config)
    names = sorted(
        p.relative_to(finished_run / "results/test")
        for p in (finished_run / "results/test/perturb").rglob("*.parquet")
    )
    assert len(names) == 20
    for name in names:
        fast = pd.read_parquet(finished_run / "results/test" / name)
        naive = pd.read_parquet(finished_run / "results/test-naive" / name)
        assert (fast["margin"] - naive["margin"]).abs().max() < 1e-4, name
        assert fast["prediction"].tolist() == naive["prediction"].tolist()
        assert (
            files.read_parquet_metadata(finished_run / "results/test-naive" / name)["method"]
            == "naive"
        )
    assert not (finished_run / "results/test-naive/activations").exists()
    rms = pd.read_parquet(finished_run / "results/test/baseline/head_rms.parquet")
    noise = pd.read_parquet(
        finished_run / "results/test/perturb/o_proj_input/all/noise_scale2/layer0/head1.parquet"
    )
    expected = 2.0 * rms.query("site == 'o_proj_input' and layer == 0 and head == 1")["rms"].item()
    assert set(noise["noise_mode"]) == {"relative"}
    assert noise["sigma"].iloc[0] == pytest.approx(expected)


def test_changing_a_prompt_setting_reruns_prompts_and_everything_after(finished_run, base_config):
    config = copy.deepcopy(base_config)
    config["prompts"]["seed"] = 1
    assert planned_jobs(finished_run, config) == {
        "select_reviews": 1,
        "build_prompts": 1,
        "pair_prompts": 1,
        "baseline": 1,
        "capture_cache": 1,
        "perturb_head": 14,
        **AFTER_THE_JOBS,
    }


def test_report_holds_every_plot_and_table(finished_run, base_config, tmp_path):
    """`snakemake --report` gathers every plot and table with its caption."""
    snakemake(finished_run, base_config)  # back to the base config's outputs
    report = tmp_path / "report.html"
    snakemake(finished_run, base_config, "--report", str(report))
    html = report.read_text()
    plots = [
        "contribution_distributions.png",
        "detailed_head_analysis.png",
        "layer_head_heatmap.png",
    ]
    for name in [*plots, "contributions.csv", "summary.md", "selection.csv"]:
        assert name in html, name
    for caption in (
        "Distributions of the contribution scores",
        "One bar per head",
        "One row per perturbed head",
    ):
        assert caption in html, caption
    summary = (finished_run / "results/test/summary.md").read_text()
    assert "## Baseline" in summary and "## Strongest heads per setting" in summary


def test_lint_finds_nothing(finished_run, base_config):
    result = snakemake(finished_run, base_config, "--lint", check=False)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    assert "Lints for" not in text and "Congratulations" in text, text


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_pipeline_runs_on_other_families(tmp_path, base_config, tiny_tokenizer_dir, family):
    """GPT-2 (Conv1D c_proj) and GPT-NeoX (parallel attention and MLP), a middle and the last
    layer, end to end; the middle layer's recording starts from the one of the layer below
    (plans.recording_source), and its jobs give what full forward passes give."""
    from tiny_models import build_tiny_model

    config = copy.deepcopy(base_config)
    config["model"]["name"] = f"tiny-{family}"
    config["model"]["path"] = str(
        build_tiny_model(tmp_path / family, tiny_tokenizer_dir, family, n_layers=4)
    )
    config["perturbation"].update(
        heads=[0, 3],
        repeats=1,
        sweeps=[{"layers": [2, -1], "positions": ["all"]}, {"layers": [0], "positions": ["last"]}],
    )
    snakemake(tmp_path, config)
    run = tmp_path / "results/test"
    table = pd.read_csv(run / "contributions.csv")
    noise = table[table["kind"] == "noise"]
    assert sorted(zip(noise["position"], noise["layer"], noise["head"])) == [
        ("all", 2, 0),
        ("all", 2, 3),
        ("all", 3, 0),
        ("all", 3, 3),
        ("last", 0, 0),
        ("last", 0, 3),
    ]
    assert (run / "plots/layer_head_heatmap.png").is_file()
    info = files.read_json(tmp_path / f"resources/models/tiny-{family}/headperturb_model.json")
    assert info["model_type"] == family and info["n_heads"] == 4
    assert (
        "starting from the recorded input of layer 1"
        in (run / "logs/capture_layer/layer2.log").read_text()
    )
    assert (run / "activations/layer1.safetensors").is_file()
    naive_config = copy.deepcopy(config)
    naive_config["run_name"] = "naive"
    naive_config["perturbation"].update(
        method="naive", kinds=["zero"], sweeps=[{"layers": [2], "positions": ["all"]}]
    )
    snakemake(tmp_path, naive_config)
    for head in (0, 3):
        path = f"perturb/o_proj_input/all/zero/layer2/head{head}.parquet"
        fast = files.read_parquet(run / path)
        naive = files.read_parquet(tmp_path / "results/naive" / path)
        for column in ("logit_negative", "logit_positive"):
            np.testing.assert_allclose(fast[column], naive[column], atol=1e-4)


def test_a_killed_run_leaves_no_partial_output_and_resumes(tmp_path, base_config):
    """SIGKILL the whole run while perturbation jobs run: every output present is complete, and
    the next run redoes only what is missing."""
    import signal
    import time

    config = copy.deepcopy(base_config)
    config["perturbation"].update(
        method="naive", heads="all", kinds=["noise"], sweeps=[{"layers": [-1]}]
    )
    config["prompts"]["n_test"] = 64  # head jobs long enough to be killed while they run
    proc = launch(
        workdir=tmp_path,
        config=config,
        background={"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL},
    )
    logs = tmp_path / "results/test/logs/perturb"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if logs.exists() and any(logs.rglob("*.log")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before a perturbation job started"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    outputs = list((tmp_path / "results/test").rglob("*.parquet"))
    for path in outputs:
        pd.read_parquet(path)  # every output file that exists is complete
    done = {p.name for p in (tmp_path / "results/test/perturb").rglob("*.parquet")}
    assert len(done) < 4  # the kill came before the sweep finished
    assert "contributions.parquet" not in {p.name for p in outputs}
    snakemake(tmp_path, config, "--unlock")  # the killed run's lock, as Snakemake asks
    resumed = snakemake(tmp_path, config, "--rerun-incomplete")
    assert len(list((tmp_path / "results/test/perturb").rglob("*.parquet"))) == 4
    assert "Nothing to be done" not in resumed.stdout + resumed.stderr
    assert planned_jobs(tmp_path, config) == {}


def test_pipeline_runs_through_slurm(tmp_path, base_config):
    """The tiny pipeline with `--profile profiles/slurm` on a real SLURM (CI starts a single-node
    one with .ci/slurm.sh); every job must show up in the scheduler's own records as COMPLETED."""
    import shutil

    if shutil.which("sbatch") is None or subprocess.run(["sinfo"], capture_output=True).returncode:
        if os.environ.get("HEADPERTURB_REQUIRE_SLURM"):
            pytest.fail(
                "HEADPERTURB_REQUIRE_SLURM is set but no SLURM answers (run .ci/slurm.sh start)"
            )
        pytest.skip("no SLURM here; CI starts one with .ci/slurm.sh")
    # the test node has 2 CPUs: the model rules' 4 would never be scheduled
    model_rules = ("prepare_model", "build_prompts", "baseline", "capture_layer", "capture_cache")
    result = snakemake(
        tmp_path,
        base_config,
        "--profile",
        str(REPO / "profiles/slurm"),
        "--set-resources",
        *[f"{rule}:cpus_per_task=1" for rule in model_rules],
        "--set-threads",
        *[f"{rule}=1" for rule in model_rules],
    )
    text = result.stdout + result.stderr
    job_ids = re.findall(r"submitted with SLURM jobid (\d+)", text)
    assert len(job_ids) >= 6, text[-3000:]
    for job_id in job_ids:
        record = subprocess.run(
            ["scontrol", "show", "job", job_id], capture_output=True, text=True
        ).stdout
        assert "JobState=COMPLETED" in record, record
    assert (tmp_path / "results/test/contributions.csv").is_file()
    assert (tmp_path / ".snakemake/slurm_logs/rule_baseline").is_dir()
    assert any((tmp_path / ".snakemake/slurm_logs").glob("group_heads*"))  # head jobs grouped


def test_the_screen_chooses_heads_to_measure_and_reports_its_agreement(finished_run, base_config):
    """A sweep whose heads the screen chooses: the screen runs once, the chosen heads are
    measured exactly, its agreement with every head measured both ways is in the summary; asking
    for more heads later adds only their jobs."""
    config = copy.deepcopy(base_config)
    config["perturbation"]["sweeps"].append(
        {"layers": "all", "positions": ["all"], "kinds": ["zero"], "heads": {"screen_top": 2}}
    )
    snakemake(finished_run, config)
    results = finished_run / "results/test"
    heads = pd.read_parquet(results / "screen/heads.parquet")
    zero_all = heads[(heads["kind"] == "zero") & (heads["position"] == "all")]
    assert len(zero_all) == 2 * 4 and sorted(zero_all["rank"]) == list(range(1, 9))
    top = set(zip(zero_all.nsmallest(2, "rank")["layer"], zero_all.nsmallest(2, "rank")["head"]))
    table = pd.read_parquet(results / "contributions.parquet")
    measured = set(
        zip(*table.query("kind == 'zero' and position == 'all'")[["layer", "head"]].T.values)
    )
    assert top <= measured
    agreement = pd.read_csv(results / "screen/agreement.csv")
    assert {"spearman", "pearson", "sign_agreement", "largest_miss"} <= set(agreement.columns)
    assert set(agreement["position"]) == {"all", "last"}  # the last-position sweep is compared too
    summary = (results / "summary.md").read_text()
    assert "## Screen (estimates, not measurements)" in summary and "Spearman" in summary
    assert (results / "plots/screen_map.png").is_file()
    config["perturbation"]["sweeps"][-1]["heads"] = {"screen_top": 3}
    planned = planned_jobs(finished_run, config)
    assert planned["perturb_head"] == 1 and "screen" not in planned
    config["perturbation"]["sweeps"][-1]["heads"] = {"screen_top": 100}  # more than there are
    out = snakemake(finished_run, config, "-n")
    assert (
        "asks for more heads than the 8 of layers 0..1: all 8 are measured"
        in out.stdout + out.stderr
    )


def test_the_workflow_works_as_a_snakemake_module(tmp_path, base_config):
    """Another workflow includes this one with `module` and `use rule * from`, from another
    folder, without copying it and without sys.path edits (the package comes from the
    environment)."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(base_config))
    (tmp_path / "Snakefile").write_text(
        'configfile: "config.yaml"\n\n'
        f'module headperturb:\n    snakefile: "{REPO / "Snakefile"}"\n    config: config\n\n'
        "use rule * from headperturb\n"
    )
    result = launch("-n", cwd=tmp_path, cores=1, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert re.search(r"^perturb_head\s+14$", out, re.M), out[-3000:]
    for path in [
        REPO / "Snakefile",
        *(REPO / "workflow").rglob("*.py"),
        *(REPO / "workflow").rglob("*.smk"),
    ]:
        assert "sys.path" not in path.read_text(), path


def test_the_anatomy_of_every_head_beside_its_effects(tmp_path, finished_run, base_config):
    """anatomy.enabled adds only its own jobs and the summary; every head gets its attention
    shares (summing to 1), type scores and writes, the joined table, the map and the cards."""
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir, symlinks=True)
    config = copy.deepcopy(base_config)
    config["anatomy"] = {"enabled": True, "repeat_sequences": 3, "repeat_length": 8, "cards": 1}
    planned = planned_jobs(workdir, config)
    anatomy_jobs = {
        "attention_shares": 1,
        "head_types": 1,
        "function_vectors": 1,
        "head_writes": 1,
        "anatomy": 1,
        "plot_attention_map": 1,
        "plot_head_cards": 1,
    }
    assert {rule: planned.get(rule) for rule in anatomy_jobs} == anatomy_jobs
    # besides: the summary, and the table and figures where an earlier test left the run with
    # another config's; never a model pass of the head jobs
    assert set(planned) - set(anatomy_jobs) <= {"summarize", "all", "aggregate", "plot"}
    snakemake(workdir, config)
    results = workdir / "results" / "test"
    heads = pd.read_csv(results / "anatomy/heads.csv")
    assert len(heads) == 2 * 4  # every head of the tiny Llama's two layers
    shares = heads[[c for c in heads if c.startswith("share_")]].sum(axis=1)
    assert np.allclose(shares, 1.0, atol=1e-6)
    assert heads["zero_change_logit_diff"].notna().sum() == 2  # layer 0 heads 0, 1 at last
    cards = sorted(p.name for p in (results / "plots/head_cards").glob("*.png"))
    assert cards == ["L0H1.png"]  # the largest zero ablation at the final position
    summary = (results / "summary.md").read_text()
    assert "## What kind of head" in summary and f"plots/head_cards/{cards[0]}" in summary
    assert (results / "plots/attention_map.png").read_bytes()[:4] == b"\x89PNG"
    # every file, field and column docs/claims.yaml names about the default run is in this run
    # of the test config too (its values are checked on the default run)
    written = yaml.safe_load((REPO / "docs/claims.yaml").read_text())["claims"]
    problems, _ = claims.unresolved(written, results)
    unpatched = [  # this run measures no patching: its heads have no patch effect
        f"{c['key']}: anatomy/heads.csv has no column patch_effect"
        for c in written
        if c["file"] == "anatomy/heads.csv" and c.get("column") == "patch_effect"
    ]
    assert problems == unpatched, problems
    absent = {c["file"] for c in written if not (results / c["file"]).is_file()}
    # this run has no curves and no screen (test_heads_together's has both): their claims alone
    # name absent files
    assert absent and all(name.startswith(("curves/", "screen/")) for name in absent), absent
