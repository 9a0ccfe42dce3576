"""A run is what its config asked for, or it stops with one message, before the work it protects.

Every shipped config plans from the repository root; a mistake in the config, the data or the
model's shape stops the run before any job; a per-head file computed for other settings stops the
aggregation; a result that cannot be a measurement stops its job; a failed job's log holds the
error; a corrupt input names itself and the fix.
"""

from __future__ import annotations

import base64
import copy
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from runs import REPO, hint, launch, planned_jobs, snakemake, tiny_config

from headperturb.core import config as run_config
from headperturb.core import files

SCHEMA = REPO / "workflow/schemas/config.schema.yaml"


# -- configs compose ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory) -> Path:
    """The repository's files (tracked, and new ones git does not ignore), nothing else."""
    root = tmp_path_factory.mktemp("fresh") / "headperturb"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in listed:
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    return root


def _from_root(root: Path, *args: str) -> subprocess.CompletedProcess:
    """Snakemake as a user runs it: from the repository root, no --directory."""
    return launch(*args, cwd=root, cores=1, timeout=300)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "config").glob("*.yaml")))
def test_every_shipped_config_plans_from_the_repository_root(fresh_copy, name):
    result = _from_root(fresh_copy, "-n", "--configfile", f"config/{name}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert not (fresh_copy / "results").exists()


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "config").glob("*.yaml")))
def test_every_shipped_config_lints_clean_from_the_repository_root(fresh_copy, name):
    """`snakemake --lint` as the README gives it: no lint printed, exit 0 (issue 25)."""
    result = _from_root(fresh_copy, "--lint", "--configfile", f"config/{name}")
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-3000:]
    assert "Lints for" not in text and "Congratulations" in text, text[-3000:]


def test_a_users_config_file_replaces_the_default_and_command_line_values_override(
    fresh_copy, tiny_llama_dir, imdb_dir
):
    """A file that sets model.path is not merged with the default's PyPI wheel; keys it leaves
    out take the schema's defaults; --config overrides single keys of either."""
    own = fresh_copy / "mine.yaml"
    own.write_text(
        yaml.safe_dump(
            {
                "run_name": "mine",
                "model": {"name": "tiny", "path": str(tiny_llama_dir)},
                "data": {"path": str(imdb_dir)},
            }
        )
    )
    result = _from_root(fresh_copy, "-n", "--configfile", "mine.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "results/mine/perturb/o_proj_input/all/noise_scale2/layer1/head3.parquet" in result.stdout
    )
    assert "fetch_model" not in result.stdout
    result = _from_root(fresh_copy, "-n", "--config", f"data={{path: {imdb_dir}}}", "run_name=cli")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fetch_model" in result.stdout and "results/cli/" in result.stdout  # the default run


def test_numbers_written_as_yaml_text_are_numbers():
    config = yaml.safe_load(
        "perturbation: {scales: [1e30, 2.0]}\nrun_name: x\nmodel: {name: m, path: p}"
    )
    assert config["perturbation"]["scales"][0] == "1e30"  # what YAML 1.1 makes of it
    checked = run_config.validate(config, SCHEMA)
    assert checked["perturbation"]["scales"] == [1e30, 2.0]
    assert checked["prompts"]["k_shot"] == 4 and checked["scoring"]["calibration"] == "none"
    # --config 'perturbation={heads: [0, 1]}' gives text; heads is `all`, an integer or a list
    config["perturbation"].update(heads=["0", "1"], layers=["-1"])
    checked = run_config.validate(config, SCHEMA)
    assert checked["perturbation"]["heads"] == [0, 1] and checked["perturbation"]["layers"] == [-1]


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"prompt": {}},
            "config: unknown key 'prompt'; allowed keys: anatomy, categories, data, "
            "direct_effects, model,",
        ),
        (
            {"perturbation": {"scales": [0.0]}},
            "config: perturbation.scales[0] = 0.0 is not allowed; it must be > 0",
        ),
        (
            {"perturbation": {"kinds": ["shuffle"]}},
            "perturbation.kinds[0] = 'shuffle' is not allowed; allowed: noise, zero, mean, "
            "resample",
        ),
        (
            {"perturbation": {"sweeps": [{"positions": ["labels"]}]}},
            "perturbation.sweeps[0].positions[0] = 'labels' is not allowed; allowed: all, last, "
            "demonstrations, review, label_words, or a name matching '\\^demonstration_",
        ),
        (
            {"perturbation": {"sweeps": [{"layer": [1]}]}},
            "unknown key 'perturbation.sweeps[0].layer'",
        ),
        (
            {
                "model": {
                    "name": "m",
                    "path": "p",
                    "pypi_wheel": {"requirement": "a", "member": "b"},
                }
            },
            "model needs exactly one source, .* found both path and pypi_wheel",
        ),
        (
            {"prompts": {"template": "Review: {text}"}},
            "prompts.template = 'Review: {text}' is not allowed: it must match",
        ),
    ],
)
def test_config_mistakes_get_one_line_naming_key_value_and_what_is_allowed(change, message):
    config = {"run_name": "x", "model": {"name": "m", "path": "p"}}
    for key, value in change.items():
        config[key] = {**config.get(key, {}), **value} if key == "model" else value
    with pytest.raises(
        run_config.ConfigError,
        match=message.replace("[", r"\[")
        .replace("]", r"\]")
        .replace("{", r"\{")
        .replace("}", r"\}"),
    ) as info:
        run_config.validate(config, SCHEMA)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


# -- errors before the model -----------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c: c["data"].update(path="/no/such/imdb"),
            "data.path '/no/such/imdb' does not exist",
        ),
        (
            lambda c: c["data"].update(path="/x/imdb_{split}_{n}.csv"),
            "the only placeholder allowed is {split}",
        ),
        (
            lambda c: c["perturbation"]["sweeps"][1].update(layers=[5]),
            "layer 5 is out of range: the model has 2 layers (allowed -2..1, negative ones "
            "from the end)",
        ),
        (
            lambda c: c["perturbation"].update(heads=[4]),
            "head 4 is out of range: the model has 4 query heads (allowed 0..3)",
        ),
        (
            lambda c: c["prompts"].update(k_shot=100000),
            "asks for 100004 negative reviews from the train split, which has 12432",
        ),
        (
            lambda c: c["prompts"].update(n_test=30000),
            "n_test asks for 15000 negative reviews from the test split",
        ),
        (lambda c: c.update(prompt={}), "config: unknown key 'prompt'"),
        (
            lambda c: c["prompts"].update(template="Review: {text} {foo}\nSentiment: {label}"),
            "holds the placeholder(s) {foo}; the only placeholders are {text} and {label}",
        ),
        (
            lambda c: c["prompts"].update(template="Review: {text} {text}\nSentiment: {label}"),
            "must contain {text} exactly once",
        ),
        (
            lambda c: c["model"].update(sha256="0" * 64, path="someone/hub-model"),
            "model.sha256 is given, but model.path 'someone/hub-model' is a hub id",
        ),
        (
            lambda c: c.update(run_name="résumé"),
            "ASCII letters and digits",
        ),
    ],
)
def test_mistakes_stop_the_run_before_any_job(tmp_path, tiny_llama_dir, imdb_dir, change, message):
    config = tiny_config(tiny_llama_dir, imdb_dir)
    change(config)
    result = snakemake(tmp_path, config, check=False)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in out, out[-3000:]
    assert (
        "jobid" not in out
        and not (tmp_path / "results").exists()
        and not (tmp_path / "resources").exists()
    )
    assert len(out.splitlines()) < 8  # one message and the line that asked, not the schema
    assert out.count('  File "') <= 2  # not the frames of the checks


@pytest.mark.parametrize(
    "form, frame, message",
    [
        (
            "csv",
            {"text": ["a", "b"], "stars": [1, 0]},
            "train.csv: no column 'label' (found 'text', 'stars')",
        ),
        (
            "csv",
            {"text": ["a", "b"], "label": ["neg", "pos"]},
            "train.csv: column 'label' holds 'neg', 'pos'; labels must be the two classes "
            "0 (negative) and 1 (positive)",
        ),
        (
            "parquet",
            {"review": ["a", "b"], "label": [0, 1]},
            "train.parquet: no column 'text' (found 'review', 'label')",
        ),
    ],
)
def test_a_data_problem_names_the_file_and_the_column(
    tmp_path, tiny_llama_dir, form, frame, message
):
    """Label and column problems get their own diagnosis (not a count of zero reviews), for CSV
    and Parquet, while the DAG is built."""
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "test"):
        table = pd.DataFrame(frame)
        path = data / f"{split}.{form}"
        table.to_csv(path, index=False) if form == "csv" else table.to_parquet(path)
    config = tiny_config(tiny_llama_dir, data)
    result = snakemake(tmp_path / "run", config, check=False)
    out = result.stdout + result.stderr
    assert result.returncode != 0 and message in out, out[-3000:]
    assert "asks for" not in out and "jobid" not in out


# -- a run that cannot be trusted stops ------------------------------------------------------


@pytest.fixture(scope="module")
def trust_run(tmp_path_factory, tiny_llama_dir, imdb_dir):
    """A finished tiny run; tests work on copies of its folder."""
    workdir = tmp_path_factory.mktemp("trust")
    config = tiny_config(tiny_llama_dir, imdb_dir)
    config["perturbation"]["sweeps"] = [{"layers": [-1], "kinds": ["noise", "zero"]}]
    snakemake(workdir, config)
    return workdir, config


@pytest.fixture
def run_copy(tmp_path, trust_run):
    workdir, config = trust_run
    shutil.copytree(workdir, tmp_path / "run", symlinks=True)
    return tmp_path / "run", copy.deepcopy(config)


def _forget(workdir: Path, relative: str) -> None:
    """Drop Snakemake's record of an output, as for a file written by an orphaned job or copied
    in from elsewhere."""
    name = base64.urlsafe_b64encode(relative.encode()).decode()
    (workdir / ".snakemake/metadata" / name).unlink()


def test_a_table_cannot_mix_settings(run_copy):
    """Seed 0 -> 1: the jobs Snakemake knows rerun, two files it has no record of do not; the
    aggregation names those and says how to redo them, and the fix works."""
    workdir, config = run_copy
    orphans = [
        "results/test/perturb/o_proj_input/all/noise_scale2/layer1/head0.parquet",
        "results/test/perturb/o_proj_input/all/zero/layer1/head1.parquet",
    ]
    for name in orphans:
        _forget(workdir, name)
    config["perturbation"]["seed"] = 1
    result = snakemake(workdir, config, check=False)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert (
        "2 per-head result file(s) were computed with other settings than this run's config" in out
    )
    assert hint(workdir, "--forcerun $(cat results/test/stale_results.txt)") in out
    assert (
        f"{orphans[0]}: seed 0, config 1"
        in (workdir / "results/test/logs/aggregate.log").read_text()
    )
    listed = (workdir / "results/test/stale_results.txt").read_text().split()
    assert sorted(listed) == sorted(orphans)
    snakemake(workdir, config, "--forcerun", *listed)
    table = pd.read_parquet(workdir / "results/test/contributions.parquet")
    for name in orphans:
        assert files.read_parquet_metadata(workdir / name)["settings"]["seed"] == 1
    assert len(table) == 4


def test_a_changed_setting_is_named_though_the_rerun_triggers_leave_it_out(trust_run):
    """--rerun-triggers mtime would keep the tables of the old seed without a word: the run
    (a dry run too) stops before any job, naming the steps and a command that reruns them."""
    workdir, config = trust_run
    changed = copy.deepcopy(config)
    changed["prompts"]["seed"] += 1
    result = snakemake(workdir, changed, "--rerun-triggers", "mtime", "-n", check=False)
    last = result.stderr.rstrip().splitlines()[-1]
    assert result.returncode == 1, result.stderr[-2000:]
    assert last.startswith("headperturb: the config changes the settings of finished steps (")
    assert "build_prompts (1 job(s))" in last
    assert hint(workdir, "--forcerun", "build_prompts") in last
    same = snakemake(workdir, config, "--rerun-triggers", "mtime", "-n", check=False)
    assert same.returncode == 0 and "Nothing to be done" in same.stdout + same.stderr


def test_changing_repeats_reruns_only_the_kinds_that_draw(trust_run):
    """Zero ablation evaluates one draw whatever perturbation.repeats says: its jobs stay."""
    workdir, config = trust_run
    changed = copy.deepcopy(config)
    changed["perturbation"]["repeats"] += 1
    planned = planned_jobs(workdir, changed)
    assert planned["perturb_head"] == 2 and planned["aggregate"] == 1, planned  # noise, 2 heads


def test_a_corrupt_result_file_names_itself_and_deleting_it_remakes_it(run_copy):
    """Random bytes in a per-head file with an old timestamp: noticed while the DAG is built, with
    the command to paste; deleted, as the message also says, the next plain run makes it again
    and the table after it (Snakemake alone remakes a missing file only for a job that runs)."""
    workdir, config = run_copy
    name = "results/test/perturb/o_proj_input/all/zero/layer1/head0.parquet"
    (workdir / name).write_bytes(np.random.default_rng(0).bytes(3000))
    os.utime(workdir / name, (1_000_000_000, 1_000_000_000))
    result = snakemake(workdir, config, check=False)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"not readable Parquet files (corrupt or truncated), e.g. {name}" in out
    assert hint(workdir, "--forcerun", name) in out
    table = workdir / "results/test/contributions.parquet"
    before = table.stat().st_mtime_ns
    (workdir / name).unlink()
    snakemake(workdir, config)
    pd.read_parquet(workdir / name)
    assert table.stat().st_mtime_ns > before


def test_a_failed_job_leaves_its_error_in_its_log(run_copy):
    """A corrupt recorded state: the head job's log holds the message and the traceback, the
    terminal one line naming the file and the fix; the failed job leaves no output."""
    workdir, config = run_copy
    state = workdir / "results/test/baseline/final_state.safetensors"
    state.write_bytes(b"\x00" * 64)
    before = {
        p: p.stat().st_mtime_ns for p in (workdir / "results/test/perturb").rglob("*.parquet")
    }
    result = snakemake(workdir, config, check=False)  # the head jobs read the newer state
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "final_state.safetensors cannot be read" in out and "--forcerun" in out
    last = result.stderr.rstrip().splitlines()[-1]  # one line for the jobs with this cause
    assert last.startswith("headperturb: perturb_head site=") and "cannot be read" in last
    assert "RuleException" not in out and "Error in rule" not in out
    failed = [
        p
        for p in (workdir / "results/test/logs/perturb").rglob("*.log")
        if "cannot be read" in p.read_text()
    ]
    assert failed and "Traceback (most recent call last)" in failed[0].read_text()
    output = Path(str(failed[0]).replace("/logs/", "/").replace(".log", ".parquet"))
    assert not output.exists() or output.stat().st_mtime_ns == before[output]


def test_a_failed_step_leaves_its_error_in_its_log(tmp_path, tiny_llama_dir, imdb_dir):
    """build_prompts runs in a thread of the Snakemake process: its log holds the message and the
    traceback, the terminal the one line."""
    config = tiny_config(tiny_llama_dir, imdb_dir)
    config["prompts"]["verbalizers"] = ["negative", " positive"]
    result = snakemake(tmp_path, config, check=False)
    out = result.stdout + result.stderr
    message = (
        "PromptError: verbalizers ('negative', ' positive'): both or neither must start with "
        "white space"
    )
    log_file = "results/test/logs/build_prompts.log"
    # the run ends with the one line: the step, the cause, its log; no Snakemake error block
    assert result.returncode == 1
    assert result.stderr.rstrip().splitlines()[-1] == (
        f"headperturb: build_prompts failed: {message} (log: {log_file})"
    )
    for block in ("RuleException", "Error in rule", "Exiting because", "Traceback"):
        assert block not in out
    log = (tmp_path / log_file).read_text()
    assert "both or neither must start" in log and "Traceback (most recent call last)" in log
    assert not (tmp_path / "results/test/prompts/prompts.parquet").exists()


def test_a_result_that_cannot_be_a_measurement_stops_its_job(trust_run, tmp_path):
    """Noise of 1e30 swamps the model's numerics: the job stops with a message naming the
    setting instead of writing a table of constant logits."""
    from headperturb.analysis import scoring
    from headperturb.core import kinds
    from headperturb.core.spec import HeadJob, Job
    from headperturb.model import headjob
    from headperturb.model.context import ModelSpec, PromptFiles

    workdir, _ = trust_run
    results = workdir / "results/test"
    target = HeadJob(
        site="o_proj_input", position="all", kind="noise", scale="1e+30", layer=1, head=0
    )
    job = Job(target, kinds.Noise(scale=1e30), repeats=2)
    inputs = headjob.JobInputs(
        PromptFiles(
            str(results / "prompts/prompts.parquet"), str(results / "prompts/prompt_info.json")
        ),
        state=str(results / "baseline/final_state.safetensors"),
        program=str(results / "baseline/last_layer"),
    )
    model = ModelSpec(str(workdir / "resources/models/tiny-llama"), "cpu")
    with pytest.raises(scoring.NumericsError, match="noise sigma 1e\\+30, layer 1 head 0, draw 0"):
        headjob.perturb(job, inputs, model, tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()
    logits = np.array([[0.0, 0.0], [0.0, 0.0]])
    with pytest.raises(scoring.NumericsError, match="equal for every prompt"):
        scoring.check_logits(logits, [0, 1])
    with pytest.raises(scoring.NumericsError, match="every prompt got the same logits"):
        scoring.check_logits(np.array([[1.0, 2.0], [1.0, 2.0]]), [0, 1])
    with pytest.raises(scoring.NumericsError, match=r"prompt id\(s\) \[7\]"):
        scoring.check_logits(np.array([[1.0, 2.0], [np.nan, 2.0]]), [3, 7])


# -- recordings, checksums and processes: nothing wrong kept with exit code 0 (issue 21) -------


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory, tiny_llama_dir, imdb_dir):
    """A finished tiny run whose head jobs read recordings (the final state, the exported last
    layer, the keys and values), and the keys and values another run recorded for other prompts."""
    workdir = tmp_path_factory.mktemp("recorded")
    config = tiny_config(tiny_llama_dir, imdb_dir)
    config["perturbation"]["sweeps"] = [
        {"layers": [-1], "kinds": ["zero"]},
        {"layers": [0], "positions": ["last"], "kinds": ["zero"]},
    ]
    snakemake(workdir, config)
    other = copy.deepcopy(config)
    other.update(run_name="other")
    other["prompts"]["seed"] = 1
    snakemake(workdir, other, "--until", "capture_cache")
    return workdir, config


@pytest.mark.parametrize(
    "recording", ["activations/cache.safetensors", "baseline/final_state.safetensors"]
)
def test_another_runs_recording_is_refused_naming_the_file_and_the_fix(
    recorded_run, tmp_path, recording
):
    """A recording copied in from a run with other prompts: the head jobs that read it stop with
    one message naming the file and the --forcerun that remakes it, and the fix works."""
    workdir, config = recorded_run
    run = tmp_path / "run"
    shutil.copytree(workdir, run, symlinks=True)
    if recording.startswith("activations"):
        shutil.copy(run / "results/other" / recording, run / "results/test" / recording)
    else:  # the same shape, recorded for other prompts: the provenance tells them apart
        from headperturb.model import recordings

        path = run / "results/test" / recording
        meta = {**recordings.load_metadata(path), "prompts_sha256": "0" * 64}
        del meta["checksums"]
        recordings.save(path, recordings.load(path), meta)
    result = snakemake(run, config, check=False)
    out = result.stdout + result.stderr
    path = f"results/test/{recording}"
    assert result.returncode != 0
    assert f"{path} was recorded for other prompts" in out, out[-3000:]
    assert hint(run, "--forcerun", path) in out
    assert (
        not (run / "results/test/contributions.parquet").stat().st_mtime
        > (run / path).stat().st_mtime
    )
    snakemake(run, config, "--forcerun", path)
    assert planned_jobs(run, config) == {}


def test_a_flipped_byte_inside_a_result_stops_the_reader(run_copy):
    """One byte changed inside a per-head file's data, the file still a readable Parquet: its
    page checksum stops the aggregation, naming the file and the fix, instead of changing a row."""
    import pyarrow.parquet as pq

    workdir, config = run_copy
    name = "results/test/perturb/o_proj_input/all/zero/layer1/head0.parquet"
    path = workdir / name
    meta = pq.ParquetFile(path).metadata.row_group(0)
    column = next(
        meta.column(i)
        for i in range(meta.num_columns)
        if meta.column(i).path_in_schema == "logit_positive"
    )
    data = bytearray(path.read_bytes())
    data[column.data_page_offset + column.total_compressed_size - 3] ^= 0x10  # in the page's values
    path.write_bytes(bytes(data))  # now newer than the table: the aggregation reruns and reads it
    result = snakemake(workdir, config, check=False)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"{name} cannot be read" in out and "corrupt or incomplete" in out, out[-3000:]
    assert f"--forcerun {name}" in out
    snakemake(workdir, config, "--forcerun", name)


def _processes_in(folder: Path) -> list[str]:
    """The command lines of the processes whose working directory is ``folder``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == folder:
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_no_recording_process_outlives_the_run_that_started_it(tmp_path, tiny_llama_dir, imdb_dir):
    """SIGKILL of the Snakemake process alone while capture_cache (a process of its own) runs:
    the step ends within a second or two and never writes its file."""
    import signal
    import time

    config = tiny_config(tiny_llama_dir, imdb_dir)
    config["prompts"]["n_test"] = 600  # a recording that takes a few seconds
    config["perturbation"]["sweeps"] = [{"layers": [0], "positions": ["last"], "kinds": ["zero"]}]
    proc = launch(
        workdir=tmp_path,
        config=config,
        background={"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL},
    )
    log = tmp_path / "results/test/logs/capture_cache.log"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists():  # the step has started
            break
        time.sleep(0.05)
    assert proc.poll() is None and log.exists(), "the run ended before capture_cache recorded"
    proc.send_signal(signal.SIGKILL)  # Snakemake alone: its child processes are orphaned
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
        "capture_cache.py" in c for c in _processes_in(tmp_path)
    ):
        time.sleep(0.2)
    assert not any("capture_cache.py" in c for c in _processes_in(tmp_path)), _processes_in(
        tmp_path
    )
    time.sleep(2)
    cache = tmp_path / "results/test/activations/cache.safetensors"
    assert not cache.exists()
    assert not list(cache.parent.glob("*.tmp")) if cache.parent.exists() else True
    assert "has ended: stopping" in log.read_text()


def test_model_sha256_of_a_local_folder_is_checked_before_loading(
    tmp_path, tiny_llama_dir, imdb_dir
):
    from headperturb.core import files

    config = tiny_config(tiny_llama_dir, imdb_dir)
    config["model"]["sha256"] = "0" * 64
    result = snakemake(tmp_path, config, "--until", "prepare_model", check=False)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "model.safetensors' is" in out and "but the config expects 0000" in out, out[-3000:]
    assert not (tmp_path / "resources/models/tiny-llama").exists()
    config["model"]["sha256"] = files.sha256_file(Path(tiny_llama_dir) / "model.safetensors")
    snakemake(tmp_path, config, "--until", "prepare_model")


def test_a_prepared_model_is_the_configured_source_or_the_run_stops(run_copy, tmp_path):
    """The prepared folder records its source and the source's files; the same model.name with
    another model.path, or with the weights replaced in place, stops the run before any job,
    naming what changed and the command that prepares it again, which plans just that."""
    workdir, config = run_copy
    source = Path(config["model"]["path"])
    info = files.read_json(workdir / "resources/models/tiny-llama/headperturb_model.json")
    weights = source / "model.safetensors"
    assert info["source"] == str(source)
    assert info["source_files"]["model.safetensors"]["sha256"] == files.sha256_file(weights)
    stamp = weights.stat()
    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))  # rewritten in place
    try:
        result = snakemake(workdir, config, "-n", check=False)
    finally:
        os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"model.path {source} changed since it was prepared (model.safetensors was" in out
    other = tmp_path / "other-model"
    shutil.copytree(source, other)
    config["model"]["path"] = str(other)
    result = snakemake(workdir, config, "-n", check=False)
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "jobid" not in out
    assert f"it was prepared from {source}, and model.path is now {other}" in out, out[-3000:]
    fix = hint(workdir, "--forcerun", "prepare_model")
    assert f"`{fix}`" in out
    result = launch(*fix.split()[3:], "-n")  # pasted, as a dry run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rule prepare_model:" in result.stdout and "perturb_head" in result.stdout


def test_the_slurm_profile_where_slurm_does_not_answer_stops_in_one_line(tmp_path, base_slurm):
    """SLURM's commands installed but its controller down (faked on PATH): one line before any
    job is submitted, instead of a failure inside the plugin."""
    workdir, config = base_slurm
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("sbatch", "squeue", "sacct"):
        (fake / name).write_text("#!/bin/sh\nexit 1\n")
    (fake / "sinfo").write_text(
        "#!/bin/sh\necho 'slurm_load_partitions: Unable to contact slurm controller' >&2\nexit 1\n"
    )
    for f in fake.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}"}
    result = snakemake(
        workdir, config, "--profile", str(REPO / "profiles/slurm"), check=False, env=env
    )
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert (
        "needs a SLURM that answers here, and this one does not (sinfo: "
        "slurm_load_partitions: Unable to contact slurm controller)" in out
    ), out[-3000:]
    assert "sbatch" not in out.split("needs a SLURM")[0][-200:]
    assert not (workdir / "results").exists()


@pytest.fixture
def base_slurm(tmp_path, tiny_llama_dir, imdb_dir):
    return tmp_path / "work", tiny_config(tiny_llama_dir, imdb_dir)


def test_sigterm_stops_the_run_after_its_running_jobs_and_says_so(
    tmp_path, tiny_llama_dir, imdb_dir
):
    """SIGTERM (a cluster's time limit, `kill`): the running jobs finish, no new one starts, the
    terminal says the run was stopped (not that a job failed), the exit code is 143, the lock is
    released and the next run does what is left."""
    import signal
    import time

    config = tiny_config(tiny_llama_dir, imdb_dir)
    config["prompts"]["n_test"] = 64
    config["perturbation"].update(
        method="naive", heads="all", kinds=["noise"], sweeps=[{"layers": [-1]}]
    )
    output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    proc = launch(workdir=tmp_path, config=config, background=output)
    logs = tmp_path / "results/test/logs/perturb"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if logs.exists() and any(logs.rglob("*.log")):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    assert "the run was stopped (SIGTERM) after its running jobs finished; no job failed" in out
    assert "did not complete successfully" not in out and "Error in rule" not in out
    assert not (tmp_path / "results/test/contributions.parquet").exists()
    for path in (tmp_path / "results/test/perturb").rglob("*.parquet"):
        pd.read_parquet(path)  # what finished is complete
    snakemake(tmp_path, config)  # not locked; does what is left
    assert (tmp_path / "results/test/contributions.parquet").is_file()


def test_a_baseline_for_other_prompts_stops_the_table(run_copy):
    """The aggregation compares the baseline's prompts with the prompts the run holds now, not
    only each head file's."""
    workdir, config = run_copy
    path = workdir / "results/test/baseline/per_prompt.parquet"
    meta = files.read_parquet_metadata(path)
    meta["settings"]["prompts_sha256"] = "0" * 64
    files.write_parquet(path, pd.read_parquet(path), meta)
    _forget(workdir, "results/test/baseline/per_prompt.parquet")
    result = snakemake(workdir, config, "--forcerun", "aggregate", check=False)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "per_prompt.parquet was computed for other prompts than" in out, out[-3000:]
