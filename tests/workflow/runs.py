"""Running the workflow in the tests: :func:`launch` is the one way a test starts Snakemake (on
the repository's Snakefile in a folder of the test's, with a config written there; or in a folder
as a user runs it), :func:`snakemake` and :func:`planned_jobs` the common cases; and the
tiny-model version of config/test.yaml."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def launch(
    *args: str,
    workdir: Path | None = None,
    config: dict | None = None,
    cwd: Path | None = None,
    cores: int = 2,
    env: dict | None = None,
    background: dict | None = None,
    timeout: float = 600,
):
    """Snakemake with ``args``, the package from this checkout (``env``: variables to set besides
    this process's environment). With ``workdir``: on the repository's Snakefile in ``workdir``,
    ``config`` written there as its config file; without: in ``cwd`` (the current folder), as a
    user runs it. It runs to its end, its output captured (a ``CompletedProcess``), unless
    ``background`` gives the ``Popen`` arguments (``stdout``, ``stderr``, ``text``) to start it
    in a session of its own and return at once, for a test that signals the run."""
    cmd = [*SNAKEMAKE]
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        cmd += ["-s", str(REPO / "Snakefile"), "--directory", str(workdir)]
    if config is not None:  # written into the run's folder
        config_file = workdir / "config.yaml"
        config_file.write_text(yaml.safe_dump(config))
        cmd += ["--configfile", str(config_file)]
    cmd += ["--cores", str(cores), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})}
    if background is not None:
        return subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True, **background)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


def snakemake(
    workdir: Path, config: dict, *args: str, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run Snakemake on the repository's Snakefile in ``workdir`` with ``config`` as the config file
    (``env``: variables to set besides this process's environment); ``check``: a failure fails
    the test with the run's output."""
    result = launch(*args, workdir=workdir, config=config, env=env)
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
            f"{result.stderr[-6000:]}"
        )
    return result


def planned_jobs(workdir: Path, config: dict) -> dict[str, int]:
    """The jobs a dry run would execute, by rule (Snakemake's own job stats)."""
    result = snakemake(workdir, config, "--dry-run", "--quiet", "rules")
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return {}
    table = text[text.index("Job stats:") :]
    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)
        if m.group(1) != "total"
    }


def tiny_config(model_dir, imdb_dir, name: str = "tiny-llama") -> dict:
    """config/test.yaml on a tiny random model instead of SmolLM2."""
    config = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    config["model"] = {"name": name, "path": str(model_dir), "dtype": "float32", "device": "cpu"}
    config["data"]["path"] = str(imdb_dir)
    return config


def hint(workdir: Path, *args: str) -> str:
    """A remedy as the product prints it for a run :func:`snakemake` started in ``workdir``: the
    run's own --snakefile, --directory and --configfile, then ``args``."""
    own = f"-s {REPO / 'Snakefile'} --directory {workdir} --configfile {workdir / 'config.yaml'}"
    return " ".join(["snakemake --cores all", own, *args])
