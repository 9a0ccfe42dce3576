"""Remedies that can be pasted (core.hints), a prepared model that knows its source
(core.origin), and model mistakes named before or where they happen."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from headperturb.core import checks, files, hints, origin
from headperturb.core.spec import SpecError

ARGV = [
    "/venv/bin/snakemake",
    "--cores",
    "2",
    "-s",
    "S",
    "--directory",
    "/d",
    "--configfile",
    "a.yaml",
    "b.yaml",
    "--config",
    "data={path: x}",
    "run_name=y",
    "-n",
    "--forcerun",
    "prepare_model",
    "--profile=p",
    "results/x.csv",
]


def test_a_hint_repeats_the_users_own_workflow_folder_and_config():
    environ: dict = {}
    hints.remember(ARGV, environ)
    assert hints.command("--forcerun", "$(cat list.txt)", environ=environ) == (
        "snakemake --cores all -s S --directory /d --configfile a.yaml b.yaml "
        "--config 'data={path: x}' run_name=y --profile=p --forcerun $(cat list.txt)"
    )
    assert (
        hints.command("--forcerun", "a b", environ={}) == "snakemake --cores all --forcerun 'a b'"
    )
    hints.remember(["python", "-c", "--configfile", "x"], environ)  # not Snakemake: nothing kept
    assert hints.command(environ=environ) == "snakemake --cores all"


def test_forced_reads_forceall_and_forcerun():
    assert hints.forced(ARGV, "prepare_model") and not hints.forced(ARGV, "baseline")
    assert hints.forced(["snakemake", "-F"], "x") and hints.forced(
        ["snakemake", "-R", "a", "x"], "x"
    )
    assert hints.forced(["snakemake", "--forcerun=x"], "x") and not hints.forced(["snakemake"], "x")


def _prepared(tmp_path, source):
    """A prepared folder whose summary records ``source`` as prepare_model records it."""
    prepared = tmp_path / "prepared"
    info = {"source": str(source), "source_files": origin.source_files(source, hashes=True)}
    files.write_json(prepared / origin.INFO_FILE, info)
    return str(prepared)


@pytest.fixture
def source(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"a" * 100)
    return folder


def test_weights_replaced_in_place_stop_the_run_naming_the_file(tmp_path, source):
    model = {"name": "m", "path": str(source)}
    prepared = _prepared(tmp_path, source)
    assert (
        "sha256" in files.read_json(f"{prepared}/{origin.INFO_FILE}")["source_files"]["config.json"]
    )
    origin.check_prepared(model, prepared)  # the same files: nothing to say
    weights = source / "model.safetensors"
    before = weights.stat().st_mtime_ns
    weights.write_bytes(b"b" * 100)
    os.utime(weights, ns=(before + 10**9, before + 10**9))
    with pytest.raises(SpecError, match=r"changed since it was prepared \(model.safetensors was"):
        origin.check_prepared(model, prepared)
    weights.write_bytes(b"b" * 101)
    (source / "extra.bin").write_bytes(b"")
    with pytest.raises(SpecError, match=r"extra.bin is new; model.safetensors changed size"):
        origin.check_prepared(model, prepared)
    origin.check_prepared(model, prepared, forced=True)  # --forcerun prepare_model


def test_another_folder_under_the_same_name_stops_the_run(tmp_path, source):
    prepared = _prepared(tmp_path, source)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(SpecError) as found:
        origin.check_prepared({"name": "m", "path": str(other)}, prepared)
    message = str(found.value)
    assert f"it was prepared from {source}, and model.path is now {other}" in message
    assert "`snakemake --cores all --forcerun prepare_model`" in message
    assert "\n" not in message
    # a folder prepared by an older release recorded only its path
    files.write_json(f"{prepared}/{origin.INFO_FILE}", {"source": str(source)})
    (source / "model.safetensors").write_bytes(b"c")
    origin.check_prepared({"name": "m", "path": str(source)}, prepared)


def test_a_missing_model_path_is_neither_a_folder_nor_a_file_unless_it_is_a_hub_id(tmp_path):
    checks.check_model_path({"path": "HuggingFaceTB/SmolLM2-135M-Instruct"})  # tried on the hub
    checks.check_model_path({"path": str(tmp_path)})
    for missing in (str(tmp_path / "nope"), "nope", "models/nope/x", "nope.gguf"):
        with pytest.raises(SpecError, match=f"model.path '{missing}' is neither a folder nor"):
            checks.check_model_path({"path": missing})


def test_a_truncated_weights_file_is_named(tmp_path, tiny_llama_dir):
    import torch

    from headperturb.model import loading

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(loading.ModelError, match=f"{weights} is truncated or corrupt"):
        loading.load_source(str(folder))
    with pytest.raises(loading.ModelError, match=f"^{weights} cannot be read .*--forcerun"):
        loading._assign_weights(folder, torch.float32)


def test_ctrl_c_ends_the_run_with_its_own_line_and_130(monkeypatch, capsys):
    from types import SimpleNamespace

    from headperturb.joblog import INTERRUPTED
    from headperturb.workflow import lifecycle

    monkeypatch.setattr(lifecycle, "end_of_run", lambda: 0)
    workflow = SimpleNamespace(scheduler=SimpleNamespace(_user_kill=None, _errors=True))
    lifecycle.end_of_error(workflow)  # a job failed: Snakemake's own ending
    INTERRUPTED.set()
    try:
        with pytest.raises(SystemExit) as ended:
            lifecycle.end_of_error(workflow)
    finally:
        INTERRUPTED.clear()
    assert ended.value.code == 130
    assert "the run was interrupted (Ctrl-C)" in capsys.readouterr().err


def test_failed_jobs_end_the_run_with_one_line_per_cause(tmp_path, monkeypatch, capsys):
    """Each failed job's line comes from the record its step wrote to its log; jobs with the same
    cause share a line; a job that failed outside its step is named with its log."""
    import logging
    from types import SimpleNamespace

    from headperturb import joblog
    from headperturb.workflow import lifecycle, terminal

    with pytest.raises(joblog.JobError):
        with joblog.job(str(tmp_path / "a.log"), "perturb_head layer=1, head=0"):
            raise OSError("state.safetensors cannot be read\nsecond line")
    with pytest.raises(joblog.JobError):
        with joblog.job(str(tmp_path / "b.log"), "perturb_head layer=1, head=1"):
            raise OSError("state.safetensors cannot be read\nsecond line")
    jobs = [SimpleNamespace(log=[str(tmp_path / n)]) for n in ("a.log", "b.log", "c.log")]
    lines = terminal.failure_lines(jobs)
    assert lines[0] == (
        "headperturb: perturb_head layer=1, head=0 failed (and 1 more job(s) with this cause): "
        f"OSError: state.safetensors cannot be read (log: {tmp_path / 'a.log'})"
    )
    assert len(lines) == 2 and lines[1].endswith(
        f"failed (log: {tmp_path / 'c.log'}); Snakemake says why above"
    )
    # what Snakemake prints for those jobs leaves the terminal, not its log file
    keep = terminal.FailureLines().filter

    def record(msg, **extra):
        rec = logging.LogRecord("snakemake.logging", logging.ERROR, "", 0, msg, None, None)
        rec.__dict__.update(extra)
        return rec

    assert not keep(record('RuleException:\nJobError in file "x.smk", line 3:\nperturb_head'))
    assert not keep(record("Error in rule perturb_head, jobid: 8", log=[str(tmp_path / "a.log")]))
    assert keep(record("Error in rule perturb_head, jobid: 9", log=[str(tmp_path / "c.log")]))
    assert not keep(record("Exiting because a job execution failed. Look above for error messages"))
    assert keep(record("RuleException:\nMissingOutputException in file x.smk"))
    # the run's end: the lines, and exit code 1
    monkeypatch.setattr(lifecycle, "end_of_run", lambda: 0)
    workflow = SimpleNamespace(scheduler=SimpleNamespace(_user_kill=None, failed=jobs[:1]))
    with pytest.raises(SystemExit) as ended:
        lifecycle.end_of_error(workflow)
    assert ended.value.code == 1
    assert capsys.readouterr().err.splitlines() == terminal.failure_lines(jobs[:1])


def test_bash_run_names_the_slurm_plugin_in_one_line(tmp_path):
    """`bash run --profile profiles/slurm` where the executor plugin is missing: one line naming
    the install, exit 1, before Snakemake (whose option parser would print its whole usage)."""
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    shutil.copy(repo / "run", tmp_path / "run")
    bin_dir = tmp_path / ".venv/bin"
    bin_dir.mkdir(parents=True)
    # a set-up venv whose python has torch, the package and Snakemake, but not the SLURM plugin
    (bin_dir / "python").write_text(
        '#!/bin/sh\ncase "$2" in *snakemake_executor_plugin_slurm*) exit 1;; esac\nexit 0\n'
    )
    (bin_dir / "python").chmod(0o755)
    (bin_dir / "snakemake").write_text("#!/bin/sh\necho snakemake ran\n")
    (bin_dir / "snakemake").chmod(0o755)
    (bin_dir / "activate").write_text(f'PATH="{bin_dir}:$PATH"\n')
    result = subprocess.run(
        ["bash", str(tmp_path / "run"), "--cores", "all", "--profile", "profiles/slurm"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "snakemake ran" not in result.stdout
    assert result.stderr.strip().splitlines() == [
        "headperturb: --profile profiles/slurm needs the SLURM executor plugin: "
        'pip install -e ".[slurm]" (in .venv)'
    ]
    plain = subprocess.run(
        ["bash", str(tmp_path / "run"), "--cores", "all"], capture_output=True, text=True
    )
    assert plain.returncode == 0 and plain.stdout.strip() == "snakemake ran"
