"""Head jobs as the workflow runs them (headperturb.workflow.steps and
headperturb.model.headjob) on a prepared tiny Llama: the last-layer job on the exported program
writes what the job on the model writes, imports no transformers, and falls back to the model
when there is no program for its device or the export failed; every pass of a job writes the
reference method's numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny_models import build_tiny_model, model_params, run_step, sentiment_prompts

from headperturb.core import files
from headperturb.core.spec import HeadJob, Job
from headperturb.model import cache, headjob, loading
from headperturb.model.context import ModelSpec, PromptFiles
from headperturb.workflow import steps

REPO_SRC = str(Path(__file__).resolve().parents[2] / "src")


def _inputs(model_dir, prompt_files) -> dict:
    return {"prompts": prompt_files.prompts, "info": prompt_files.info, "model": str(model_dir)}


def _baseline(folder, model_dir, prompt_files):
    base = folder / "baseline"
    out = {
        "per_prompt": base / "per_prompt.parquet",
        "metrics": base / "metrics.json",
        "state": base / "final_state.safetensors",
        "rms": base / "head_rms.parquet",
        "program": base / "last_layer",
    }
    run_step(
        steps.baseline, input=_inputs(model_dir, prompt_files), output=out, params=model_params()
    )
    return base


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_tokenizer_dir, imdb_sample):
    """A prepared tiny Llama (3 layers), its prompts and its baseline outputs."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("program-jobs")
    source = build_tiny_model(root / "source", tiny_tokenizer_dir, "llama", seed=2, n_layers=3)
    model_dir = root / "prepared"
    loading.prepare_model(str(source), model_dir)
    train, test = imdb_sample
    built = sentiment_prompts(
        train,
        test,
        AutoTokenizer.from_pretrained(model_dir),
        k_shot=2,
        n_test=12,
        max_review_tokens=20,
    )
    prompt_files = PromptFiles(str(root / "prompts.parquet"), str(root / "prompt_info.json"))
    files.write_parquet(prompt_files.prompts, built.prompts)
    files.write_json(prompt_files.info, built.info)
    base = _baseline(root, model_dir, prompt_files)
    model = ModelSpec(str(model_dir), "cpu")
    inputs = _inputs(model_dir, prompt_files)
    run_step(
        steps.capture_cache,
        input=inputs,
        output={"cache": root / "cache.safetensors"},
        params=model_params(),
    )
    for layer in (1, 0):
        run_step(
            steps.capture_layer,
            input=inputs,
            params=model_params(),
            wildcards={"layer": layer},
            output={"activations": root / f"layer{layer}.safetensors"},
        )
    return dict(root=root, model=model, files=prompt_files, base=base)


def _job(
    run,
    out,
    *,
    layer=2,
    kind="noise",
    site="o_proj_input",
    position="all",
    method="fast",
    program=True,
    program_dir=None,
):
    base = run["base"]
    target = HeadJob(site, position, kind, "2" if kind == "noise" else "", layer, 1)
    job = Job(target, target.perturbation(), method, seed=4, repeats=3)
    last = layer == 2
    inputs = headjob.JobInputs(
        run["files"],
        state=str(base / "final_state.safetensors"),
        program=str(program_dir or base / "last_layer") if program and last else None,
        activations=str(run["root"] / f"layer{layer}.safetensors") if not last else None,
        cache=str(run["root"] / "cache.safetensors"),
        rms=str(base / "head_rms.parquet"),
    )
    return headjob.perturb(job, inputs, run["model"], out)


def test_baseline_writes_the_program_and_its_description(run):
    folder = run["base"] / "last_layer"
    meta = json.loads((folder / "program.json").read_text())
    assert (folder / "program.pt2").stat().st_size > 0
    assert meta["exported"] is True
    assert (meta["layer"], meta["n_heads"], meta["head_dim"], meta["device"]) == (2, 4, 8, "cpu")
    info = files.read_json(run["files"].info)
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
    logits = ["logit_negative", "logit_positive", "margin", "calibrated_margin"]
    np.testing.assert_allclose(fast[logits].to_numpy(), slow[logits].to_numpy(), atol=1e-5)
    pd.testing.assert_frame_equal(fast.drop(columns=logits), slow.drop(columns=logits))
    assert files.read_parquet_metadata(tmp_path / "program.parquet")["engine"] == "program"
    assert files.read_parquet_metadata(tmp_path / "model.parquet")["engine"] == "model"


@pytest.mark.parametrize("kind", ["noise", "mean"])
@pytest.mark.parametrize("layer, position", [(1, "all"), (1, "last"), (2, "last")])
def test_every_fast_job_writes_what_the_naive_job_writes(run, tmp_path, kind, layer, position):
    _job(run, tmp_path / "fast.parquet", kind=kind, layer=layer, position=position)
    _job(run, tmp_path / "naive.parquet", kind=kind, layer=layer, position=position, method="naive")
    fast, naive = (
        pd.read_parquet(tmp_path / "fast.parquet"),
        pd.read_parquet(tmp_path / "naive.parquet"),
    )
    np.testing.assert_allclose(fast["margin"], naive["margin"], atol=1e-4)
    assert fast["prediction"].tolist() == naive["prediction"].tolist()
    assert set(fast["position"]) == {position}
    meta = files.read_parquet_metadata(tmp_path / "naive.parquet")
    assert meta["method"] == "naive" and meta["settings"]["position"] == position


def test_program_job_does_not_import_transformers(run, tmp_path):
    """The job needs torch and pyarrow (which imports pandas) only, not the model code."""
    base = run["base"]
    code = f"""
import sys
sys.path.insert(0, {REPO_SRC!r})
from headperturb.model import headjob
from headperturb.model.context import ModelSpec, PromptFiles
from headperturb.core.spec import HeadJob, Job
target = HeadJob("o_proj_input", "all", "noise", "2", 2, 0)
inputs = headjob.JobInputs(PromptFiles({run["files"].prompts!r}, {run["files"].info!r}),
                           state={str(base / "final_state.safetensors")!r},
                           program={str(base / "last_layer")!r})
headjob.perturb(Job(target, target.perturbation(), repeats=2), inputs,
                ModelSpec({run["model"].path!r}, "cpu"), {str(tmp_path / "out.parquet")!r})
print(sorted(m for m in ("transformers", "sklearn", "safetensors.torch") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out.parquet").is_file()


def test_program_for_another_device_falls_back_to_the_model(run, tmp_path, caplog):
    import shutil

    other = tmp_path / "last_layer"
    shutil.copytree(run["base"] / "last_layer", other)
    from headperturb.model import tail

    meta = json.loads((other / "program.json").read_text())  # as a CUDA export writes it
    meta = {k: v for k, v in meta.items() if k != "meta_sha256"} | {"device": "cuda"}
    (other / "program.json").write_text(
        json.dumps({**meta, "meta_sha256": tail._meta_digest(meta)})
    )
    with caplog.at_level("INFO", logger="headperturb"):
        _job(run, tmp_path / "out.parquet", program_dir=other)
    assert files.read_parquet_metadata(tmp_path / "out.parquet")["engine"] == "model"
    assert "exported on cuda, this job runs on cpu" in caplog.text
    _job(run, tmp_path / "program.parquet")
    np.testing.assert_allclose(
        pd.read_parquet(tmp_path / "out.parquet")["margin"],
        pd.read_parquet(tmp_path / "program.parquet")["margin"],
        atol=1e-5,
    )


def test_failed_export_says_why_and_jobs_load_the_model(run, tmp_path, monkeypatch):
    from headperturb.model import tail

    def fail(*_args, **_kwargs):
        raise RuntimeError("cannot trace this architecture")

    monkeypatch.setattr(tail, "export", fail)
    base = _baseline(tmp_path, run["model"].path, run["files"])
    meta = json.loads((base / "last_layer" / "program.json").read_text())
    assert meta["exported"] is False
    assert "cannot trace this architecture" in meta["reason"]
    assert not (base / "last_layer" / "program.pt2").exists()
    out = tmp_path / "out.parquet"
    _job(run, out, program_dir=base / "last_layer")
    assert files.read_parquet_metadata(out)["engine"] == "model"


def test_jobs_in_threads_share_one_model_and_give_the_same_numbers(run, tmp_path):
    """Head jobs running side by side in threads (as on a workstation) load the model once and
    write what they write one after the other."""
    from concurrent.futures import ThreadPoolExecutor

    cache.clear_cache()
    layers_positions = [(1, "all"), (1, "last"), (2, "all"), (0, "last")]
    alone = []
    for i, (layer, position) in enumerate(layers_positions):
        _job(run, tmp_path / f"alone{i}.parquet", layer=layer, position=position, program=False)
        alone.append(pd.read_parquet(tmp_path / f"alone{i}.parquet"))
    loaded = [k for k in cache._store if k[0] == "model"]
    with ThreadPoolExecutor(2) as pool:
        list(
            pool.map(
                lambda a: _job(
                    run,
                    tmp_path / f"threaded{a[0]}.parquet",
                    layer=a[1][0],
                    position=a[1][1],
                    program=False,
                ),
                enumerate(layers_positions),
            )
        )
    assert [k for k in cache._store if k[0] == "model"] == loaded  # loaded once, kept
    for i, frame in enumerate(alone):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / f"threaded{i}.parquet"), frame)


def test_device_names_compare_by_device():
    from headperturb.model.tail import same_device

    assert same_device("cuda:0", "cuda") and same_device("cpu", "cpu")
    assert not same_device("cuda:0", "cpu") and not same_device("cuda:1", "cuda")


def test_a_registered_kind_runs_through_every_pass(run, tmp_path, monkeypatch):
    """A new kind is one class in kinds.py: it gets a setting name and a label, and a
    job runs it through the program, the model and the naive passes with the same numbers."""
    import re
    from dataclasses import dataclass
    from typing import ClassVar

    from headperturb.core import kinds, spec

    @dataclass(frozen=True)
    class Negate(kinds.Perturbation):
        kind: ClassVar[str] = "negate"
        needs_clean: ClassVar[bool] = True

        def values(self, *, seed, layer, head, width, repeats, clean=None):
            return lambda i, _pid, length: -clean[i][-length:][None]

    monkeypatch.setitem(kinds.PERTURBATIONS, "negate", Negate)
    assert re.fullmatch(spec.setting_pattern(), "negate")
    assert (
        spec.HeadJob("o_proj_input", "all", "negate", "", 2, 1)
        .path("r")
        .endswith("/negate/layer2/head1.parquet")
    )
    _job(run, tmp_path / "program.parquet", kind="negate")
    _job(run, tmp_path / "model.parquet", kind="negate", program=False)
    _job(run, tmp_path / "naive.parquet", kind="negate", method="naive")
    margins = [
        pd.read_parquet(tmp_path / f"{n}.parquet")["margin"] for n in ("program", "model", "naive")
    ]
    np.testing.assert_allclose(margins[0], margins[2], atol=1e-4)
    np.testing.assert_allclose(margins[1], margins[2], atol=1e-4)
    assert Negate().label() == "negate ablation"
