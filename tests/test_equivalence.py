"""The fast engine equals the reference method (full forward passes with the hook) to 1e-4.

Tiny random models with 4 layers, so that a middle layer has layers both below it (skipped by the
fast path) and above it (recomputed), and the last layer takes the one-position path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import (
    FAMILIES,  # noqa: E402
    build_tiny_model,
)

from headperturb.engine import Engine
from headperturb.prompts import build_prompts
from headperturb.sites import locate_sites


@pytest.fixture(scope="module", params=FAMILIES)
def family_setup(request, tmp_path_factory, tiny_tokenizer_dir, imdb_sample):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_tiny_model(
        tmp_path_factory.mktemp(request.param),
        tiny_tokenizer_dir,
        request.param,
        seed=1,
        n_layers=4,
    )
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    train, test = imdb_sample
    built = build_prompts(
        train, test, tok, k_shot=2, n_test=4, max_review_tokens=15,
        template="Review: {text}\nSentiment: {label}", verbalizers=(" negative", " positive"),
        separator="\n\n", seed=0, context_length=1024,
    )  # fmt: skip
    engine = Engine(model, built.info["prefix_len"], built.info["verbalizer_token_ids"])
    ids = [np.asarray(x) for x in built.prompts["input_ids"]]
    return model, engine, ids, built.prompts["prompt_id"].tolist()


def _forward_is_untouched(model, ids, before):
    with torch.no_grad():
        after = model(input_ids=torch.as_tensor(ids[0])[None]).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("where", ["o_proj_input", "o_proj_output"])
def test_last_layer_fast_path_equals_naive(family_setup, where):
    model, engine, ids, pids = family_setup
    site = locate_sites(model)[-1]
    with torch.no_grad():
        before = model(input_ids=torch.as_tensor(ids[0])[None]).logits
    base, state = engine.baseline(ids, record=site, batch_size=3)  # batches of unequal lengths
    np.testing.assert_allclose(base, np.stack([engine.full(x)[0] for x in ids]), atol=1e-4)
    kwargs = dict(site=site, head=3, where=where, scale=4.0, draws=3, seed=5)
    fast = engine.perturbed_last(state, pids, **kwargs)
    naive = engine.perturbed_naive(ids, pids, **kwargs)
    np.testing.assert_allclose(fast, naive, atol=1e-4)
    np.testing.assert_allclose(
        fast[..., 1] - fast[..., 0], naive[..., 1] - naive[..., 0], atol=1e-4
    )
    assert np.abs(fast - base[:, None, :]).max() > 1e-3  # the noise moved something
    _forward_is_untouched(model, ids, before)


@pytest.mark.parametrize("layer", [0, 2])
def test_middle_layer_fast_path_equals_naive(family_setup, layer):
    model, engine, ids, pids = family_setup
    site = locate_sites(model)[layer]
    with torch.no_grad():
        before = model(input_ids=torch.as_tensor(ids[0])[None]).logits
    captured = engine.capture_layer_inputs(ids, site)
    assert captured["prefix"].shape[0] == engine.prefix_len
    kwargs = dict(site=site, head=1, where="o_proj_input", scale=4.0, draws=2, seed=5)
    fast = engine.perturbed_from_layer(captured, ids, pids, **kwargs)
    naive = engine.perturbed_naive(ids, pids, **kwargs)
    np.testing.assert_allclose(fast, naive, atol=1e-4)
    _forward_is_untouched(model, ids, before)


def test_baseline_state_matches_the_last_layer_inputs(family_setup):
    model, engine, ids, _ = family_setup
    site = locate_sites(model)[-1]
    _, state = engine.baseline(ids, record=site)
    captured = engine.capture_layer_inputs(ids, site)
    ends = captured["offsets"][1:] - 1
    torch.testing.assert_close(state["resid_final"], captured["suffix"][ends], atol=1e-5, rtol=1e-5)
    assert state["n_tokens"].tolist() == [len(x) for x in ids]


@pytest.mark.parametrize("kind", ["zero", "mean", "resample"])
@pytest.mark.parametrize("layer", [2, 3])
def test_ablations_fast_equal_naive(family_setup, kind, layer):
    """Ablations through the fast paths (final state at the last layer, recorded input below it)
    against full forward passes."""
    from headperturb.evaluation import _perturbation

    model, engine, ids, pids = family_setup
    site = locate_sites(model)[layer]
    last = layer == 3
    if last:
        _, recorded = engine.baseline(ids, record=site)
    else:
        recorded = engine.capture_layer_inputs(ids, site)
    common = dict(site=site, head=2, where="o_proj_input", seed=3)
    width = engine.width(site, 2, "o_proj_input")

    def clean_full():
        return engine.head_activations(ids, site, 2, "o_proj_input")

    def clean_recorded():
        if last:
            return engine.final_activations(recorded, site, 2, "o_proj_input")
        return engine.head_activations(ids, site, 2, "o_proj_input", recorded)

    values, mode, draws = _perturbation(kind, width, clean_full, layer, 2, 2, 3)
    naive = engine.perturbed_naive(ids, pids, draws=draws, values=values, mode=mode, **common)
    values, mode, draws = _perturbation(kind, width, clean_recorded, layer, 2, 2, 3)
    if last:
        fast = engine.perturbed_last(
            recorded, pids, draws=draws, values=values, mode=mode, **common
        )
    else:
        fast = engine.perturbed_from_layer(
            recorded, ids, pids, draws=draws, values=values, mode=mode, **common
        )
    np.testing.assert_allclose(fast, naive, atol=1e-4)


@pytest.mark.parametrize("where", ["o_proj_input", "o_proj_output"])
def test_exported_last_layer_equals_naive(family_setup, where, tmp_path):
    """The program the baseline exports (saved and loaded back) gives the full forward passes'
    numbers, for noise and for a set (zero) ablation, and carries only the last layer."""
    from headperturb import tail

    model, engine, ids, pids = family_setup
    site = locate_sites(model)[-1]
    with torch.no_grad():
        before = model(input_ids=torch.as_tensor(ids[0])[None]).logits
    base, state = engine.baseline(ids, record=site)
    exported = tail.export(model, site, engine.token_ids, state)
    _forward_is_untouched(model, ids, before)
    vocab = model.get_input_embeddings().num_embeddings
    assert all(vocab not in t.shape for t in exported.state_dict.values())
    meta = tail.describe(model, site, engine.token_ids, "cpu", "float32")
    tail.save(tmp_path / "program", exported, meta)
    program, loaded = tail.load(tmp_path / "program", "cpu")
    assert loaded == {**meta, "exported": True}

    common = dict(head=3, where=where, draws=3)
    naive = engine.perturbed_naive(ids, pids, site=site, scale=4.0, seed=5, **common)
    fast = tail.perturbed(program, state, pids, loaded, scale=4.0, seed=5, **common)
    np.testing.assert_allclose(fast, naive, atol=1e-4)
    assert np.abs(fast - base[:, None, :]).max() > 1e-3  # the noise moved the logits

    width = engine.width(site, 3, where)

    def zero(_i, _pid, length):
        return torch.zeros(1, length, width)

    common = dict(head=3, where=where, draws=1, values=zero, mode="set")
    naive = engine.perturbed_naive(ids, pids, site=site, **common)
    fast = tail.perturbed(program, state, pids, loaded, **common)
    np.testing.assert_allclose(fast, naive, atol=1e-4)


def test_last_layer_program_refuses_another_layer(family_setup):
    from headperturb import tail

    model, engine, _ids, _pids = family_setup
    with pytest.raises(ValueError, match="not the last layer"):
        with tail.last_layer(model, locate_sites(model)[1], engine.token_ids):
            pass
