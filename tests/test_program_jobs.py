"""Last-layer perturbation jobs that run the baseline's exported last layer instead of the model.

The workflow steps (headperturb.evaluation) on a prepared tiny Llama: the program job writes the
same numbers as the job that loads the model, does not import transformers, and falls
back to the model when there is no program for its device or the export failed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from tiny_models import build_tiny_model

from headperturb import evaluation, io, models
from headperturb.prompts import build_prompts

REPO_SRC = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "src")


def _baseline(folder, model_dir, prompts_path, info_path, program=True):
    base = folder / "baseline"
    evaluation.run_baseline(
        prompts_path=prompts_path, info_path=info_path, model_dir=model_dir,
        per_prompt_path=base / "per_prompt.parquet", metrics_path=base / "metrics.json",
        state_path=base / "final_state.safetensors", rms_path=base / "head_rms.parquet",
        program_dir=base / "last_layer" if program else None, device="cpu", dtype="float32",
        threads=1,
    )  # fmt: skip
    return base


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_tokenizer_dir, imdb_sample):
    """A prepared tiny Llama (3 layers), its prompts and its baseline outputs."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("program-jobs")
    source = build_tiny_model(root / "source", tiny_tokenizer_dir, "llama", seed=2, n_layers=3)
    model_dir = root / "prepared"
    models.prepare_model(str(source), model_dir)
    train, test = imdb_sample
    built = build_prompts(
        train, test, AutoTokenizer.from_pretrained(model_dir), k_shot=2, n_test=12,
        max_review_tokens=20, template="Review: {text}\nSentiment: {label}",
        verbalizers=(" negative", " positive"), separator="\n\n", seed=0, context_length=1024,
    )  # fmt: skip
    prompts_path, info_path = root / "prompts.parquet", root / "prompt_info.json"
    io.write_parquet(prompts_path, built.prompts)
    io.write_json(info_path, built.info)
    base = _baseline(root, model_dir, prompts_path, info_path)
    return dict(root=root, model_dir=model_dir, prompts=prompts_path, info=info_path, base=base)


def _job(run, out, *, program=True, kind="noise", site="o_proj_input", program_dir=None):
    base = run["base"]
    return evaluation.run_perturbation(
        prompts_path=run["prompts"], info_path=run["info"], model_dir=run["model_dir"],
        out_path=out, activations_path=base / "final_state.safetensors",
        program_dir=(program_dir or base / "last_layer") if program else None, site=site,
        layer=2, head=1, scale="2" if kind == "noise" else "", kind=kind, repeats=3, seed=4,
        rms_path=base / "head_rms.parquet", device="cpu", dtype="float32", threads=1,
    )  # fmt: skip


def test_baseline_writes_the_program_and_its_description(run):
    folder = run["base"] / "last_layer"
    meta = json.loads((folder / "program.json").read_text())
    assert (folder / "program.pt2").stat().st_size > 0
    assert meta["exported"] is True
    assert (meta["layer"], meta["n_heads"], meta["head_dim"], meta["device"]) == (2, 4, 8, "cpu")
    info = io.read_json(run["info"])
    assert meta["token_ids"] == info["verbalizer_token_ids"]


@pytest.mark.parametrize("site", ["o_proj_input", "o_proj_output"])
@pytest.mark.parametrize("kind", ["noise", "zero", "mean", "resample"])
def test_program_job_writes_what_the_model_job_writes(run, tmp_path, kind, site):
    _job(run, tmp_path / "program.parquet", kind=kind, site=site)
    _job(run, tmp_path / "model.parquet", program=False, kind=kind, site=site)
    fast, slow = (
        pd.read_parquet(tmp_path / "program.parquet"),
        pd.read_parquet(tmp_path / "model.parquet"),
    )
    assert list(fast.columns) == list(slow.columns)
    assert len(fast) == 12 * (1 if kind in ("zero", "mean") else 3)
    logits = ["logit_negative", "logit_positive", "margin"]
    np.testing.assert_allclose(fast[logits].to_numpy(), slow[logits].to_numpy(), atol=1e-5)
    pd.testing.assert_frame_equal(fast.drop(columns=logits), slow.drop(columns=logits))
    assert io.read_parquet_metadata(tmp_path / "program.parquet")["engine"] == "program"
    assert io.read_parquet_metadata(tmp_path / "model.parquet")["engine"] == "model"


def test_program_job_does_not_import_transformers(run, tmp_path):
    """The job needs torch and pyarrow (which imports pandas) only, not the model code."""
    base = run["base"]
    code = f"""
import sys
sys.path.insert(0, {REPO_SRC!r})
from headperturb import evaluation
evaluation.run_perturbation(
    prompts_path={str(run["prompts"])!r}, info_path={str(run["info"])!r},
    model_dir={str(run["model_dir"])!r}, out_path={str(tmp_path / "out.parquet")!r},
    activations_path={str(base / "final_state.safetensors")!r},
    program_dir={str(base / "last_layer")!r}, site="o_proj_input", layer=2, head=0, scale="2",
    repeats=2, seed=0, device="cpu", dtype="float32", threads=1)
print(sorted(m for m in ("transformers", "sklearn", "safetensors.torch") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "['safetensors.torch']"
    assert (tmp_path / "out.parquet").is_file()


def test_program_for_another_device_falls_back_to_the_model(run, tmp_path, caplog):
    import shutil

    other = tmp_path / "last_layer"
    shutil.copytree(run["base"] / "last_layer", other)
    meta = json.loads((other / "program.json").read_text())
    (other / "program.json").write_text(json.dumps({**meta, "device": "cuda"}))
    with caplog.at_level("INFO", logger="headperturb"):
        _job(run, tmp_path / "out.parquet", program_dir=other)
    assert io.read_parquet_metadata(tmp_path / "out.parquet")["engine"] == "model"
    assert "exported on cuda, this job runs on cpu" in caplog.text
    _job(run, tmp_path / "program.parquet")
    np.testing.assert_allclose(
        pd.read_parquet(tmp_path / "out.parquet")["margin"],
        pd.read_parquet(tmp_path / "program.parquet")["margin"],
        atol=1e-5,
    )


def test_failed_export_says_why_and_jobs_load_the_model(run, tmp_path, monkeypatch):
    from headperturb import tail

    def fail(*_args, **_kwargs):
        raise RuntimeError("cannot trace this architecture")

    monkeypatch.setattr(tail, "export", fail)
    base = _baseline(tmp_path, run["model_dir"], run["prompts"], run["info"])
    meta = json.loads((base / "last_layer" / "program.json").read_text())
    assert meta["exported"] is False
    assert "cannot trace this architecture" in meta["reason"]
    assert not (base / "last_layer" / "program.pt2").exists()
    out = tmp_path / "out.parquet"
    evaluation.run_perturbation(
        prompts_path=run["prompts"], info_path=run["info"], model_dir=run["model_dir"],
        out_path=out, activations_path=base / "final_state.safetensors",
        program_dir=base / "last_layer", site="o_proj_input", layer=2, head=1, scale="2",
        repeats=1, seed=0, device="cpu", dtype="float32", threads=1,
    )  # fmt: skip
    assert io.read_parquet_metadata(out)["engine"] == "model"


def test_device_names_compare_by_device():
    from headperturb.tail import same_device

    assert same_device("cuda:0", "cuda") and same_device("cpu", "cpu")
    assert not same_device("cuda:0", "cpu") and not same_device("cuda:1", "cuda")
