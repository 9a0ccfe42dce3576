"""Running the workflow in the tests: Snakemake on the repository's Snakefile in a folder of the
test's, with a config written there; the tiny-model version of config/test.yaml."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(
    workdir: Path, config: dict, *args: str, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run Snakemake on the repository's Snakefile in ``workdir`` with ``config`` as the config file
    (``env``: variables to set besides this process's environment)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    cmd = [*SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(config_file), "--cores", "2", *args]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
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
