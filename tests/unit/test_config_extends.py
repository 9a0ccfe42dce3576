"""Variant configs state only what they change: ``extends`` names the base, dicts merge key by
key, ``<name>+`` adds to the base's list, and the result is checked by the schema as any config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from headperturb.core import config as run_config

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "workflow/schemas/config.schema.yaml"


def test_changes_merge_into_the_base():
    base = {"a": {"x": 1, "y": [1]}, "b": 2, "sweeps": [{"k": 1}]}
    changes = {"a": {"y": [5]}, "sweeps+": [{"k": 2}], "c": 3}
    assert run_config.merged(base, changes) == {
        "a": {"x": 1, "y": [5]},  # a list replaces the base's
        "b": 2,
        "sweeps": [{"k": 1}, {"k": 2}],  # name+ adds to it
        "c": 3,
    }
    with pytest.raises(run_config.ConfigError, match="adds to a list"):
        run_config.merged({"b": 2}, {"b+": [1]})


@pytest.mark.parametrize("variant", ["verify-screen", "segments"])
def test_a_shipped_variant_is_the_default_plus_its_sweeps(variant):
    default = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    written = yaml.safe_load((ROOT / f"config/{variant}.yaml").read_text())
    assert set(written) == {"extends", "perturbation"}  # nothing copied from the default
    resolved = run_config.resolved(written, [ROOT])
    added = written["perturbation"]["sweeps+"]
    assert resolved["perturbation"]["sweeps"] == default["perturbation"]["sweeps"] + added
    assert {k: v for k, v in resolved.items() if k != "perturbation"} == {
        k: v for k, v in default.items() if k != "perturbation"
    }
    run_config.validate(resolved, SCHEMA)


def test_extends_names_a_file_and_never_itself(tmp_path):
    with pytest.raises(run_config.ConfigError, match="names no file"):
        run_config.resolved({"extends": "missing.yaml"}, [tmp_path])
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nrun_name: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(run_config.ConfigError, match="comes back to itself"):
        run_config.resolved({"extends": "a.yaml"}, [tmp_path])
    (tmp_path / "c.yaml").write_text("run_name: c\nprompts: {n_test: 8}\n")
    (tmp_path / "d.yaml").write_text("extends: c.yaml\nprompts: {k_shot: 2}\n")
    chained = run_config.resolved({"extends": "d.yaml", "run_name": "e"}, [tmp_path])
    assert chained == {"run_name": "e", "prompts": {"n_test": 8, "k_shot": 2}}
