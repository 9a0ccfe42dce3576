"""The engine and the reference pass against plain forward passes, on the tiny random Llama."""

import numpy as np
import pytest
import torch
from tiny_models import edit_of, sentiment_prompts

from headperturb.core import files
from headperturb.core.kinds import make_noise
from headperturb.model import passes
from headperturb.model.engine import Engine
from headperturb.model.hooks import perturb_head
from headperturb.model.sites import locate_sites


@pytest.fixture(scope="module")
def setup(tiny_llama, imdb_sample):
    model, tok = tiny_llama
    train, test = imdb_sample
    built = sentiment_prompts(train, test, tok, k_shot=4, n_test=6, max_review_tokens=25)
    engine = Engine(model, built.info["prefix_len"], built.info["verbalizer_token_ids"])
    ids = [np.asarray(x) for x in built.prompts["input_ids"]]
    return model, engine, ids, built


def test_scores_with_cached_prefix_equal_full_forward(setup):
    model, engine, ids, built = setup
    cached = engine.score(ids)
    tokens = built.info["verbalizer_token_ids"]
    for i, x in enumerate(ids):
        with torch.no_grad():
            full = model(input_ids=torch.tensor(x[None])).logits[0, -1, tokens].numpy()
        np.testing.assert_allclose(cached[i], full, atol=1e-4)
    recorded = engine.baseline(ids, locate_sites(model), batch_size=4)
    np.testing.assert_allclose(recorded.logits, cached, atol=1e-6)


def test_engine_keeps_no_state_between_calls(setup):
    model, engine, ids, _ = setup
    before = dict(vars(engine))
    first = engine.baseline(ids, locate_sites(model))
    second = engine.baseline(ids[:3], locate_sites(model))
    assert dict(vars(engine)) == before
    np.testing.assert_array_equal(first.logits[:3], second.logits)
    assert (
        first.final_state["resid.1"].shape[0] == 6 and second.final_state["resid.1"].shape[0] == 3
    )


def test_baseline_rejects_a_prompt_without_the_prefix(setup):
    _, engine, ids, _ = setup
    with pytest.raises(ValueError, match="prompt 1 does not start with the shared prefix"):
        engine.score([ids[0], ids[1][::-1]])


def test_final_state_is_every_layers_input_and_head_outputs_at_the_last_position(setup):
    model, engine, ids, _ = setup
    sites = locate_sites(model)
    state = engine.baseline(ids, sites, batch_size=4).final_state
    seen = {}
    for site in sites:
        layer = model.get_submodule(site.layers_path)[site.layer]
        proj = model.get_submodule(site.module_name)
        handles = [
            layer.register_forward_pre_hook(
                lambda _m, a, k: seen.update(resid=(a or [*k.values()])[0]), with_kwargs=True
            ),
            proj.register_forward_hook(lambda _m, a, out: seen.update(z=a[0], out=out)),
        ]
        try:
            for i, x in enumerate(ids):
                with torch.no_grad():
                    model(input_ids=torch.tensor(x[None]))
                for key in ("resid", "z", "out"):
                    torch.testing.assert_close(
                        state[f"{key}.{site.layer}"][i], seen[key][0, -1], atol=1e-5, rtol=1e-5
                    )
        finally:
            for h in handles:
                h.remove()
    assert state["n_tokens"].tolist() == [len(x) for x in ids]


def test_naive_pass_matches_a_hand_made_hook_and_is_deterministic(setup):
    model, engine, ids, built = setup
    site = locate_sites(model)[1]
    edit = edit_of(model, site, 2, scale=3.0, repeats=2, seed=7)
    out = passes.naive(engine, ids[:3], [10, 11, 12], edit)
    assert out.shape == (3, 2, 2)
    np.testing.assert_array_equal(out, passes.naive(engine, ids[:3], [10, 11, 12], edit))
    tokens = built.info["verbalizer_token_ids"]
    for i, pid in enumerate([10, 11, 12]):
        noise = make_noise(
            seed=7, layer=1, head=2, scale=3.0, draws=2, prompt=pid, length=len(ids[i]), width=8
        )
        for draw in range(2):
            with perturb_head(model, site, 2, noise[draw : draw + 1]), torch.no_grad():
                ref = model(input_ids=torch.tensor(ids[i][None])).logits[0, -1, tokens].numpy()
            np.testing.assert_allclose(out[i, draw], ref, atol=1e-4)
    base = engine.score(ids[:3])
    assert np.abs(out[:, 0, :] - base).max() > 1e-3  # the noise does move the logits


def test_prepared_model_loads_identically_by_assignment(tmp_path, tiny_llama_dir):
    """load_prepared takes the weights straight from the safetensors files; the model must be
    the one from_pretrained gives, tied weights included."""
    from transformers import AutoModelForCausalLM

    from headperturb.model import loading

    info = loading.prepare_model(str(tiny_llama_dir), tmp_path / "prepared")
    assert info["seconds_per_token_layer"] > 0
    fast, tok, info = loading.load_prepared(tmp_path / "prepared", device="cpu")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "prepared").eval()
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        torch.testing.assert_close(
            fast(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0
        )
    assert tok is not None and info["n_layers"] == 2
    _, no_tok, _ = loading.load_prepared(tmp_path / "prepared", device="cpu", tokenizer=False)
    assert no_tok is None


def test_head_rms_by_hand(setup, tmp_path):
    """The baseline's per-head RMS equals the RMS over every position of every prompt, computed
    from plain full forward passes; relative noise scales by it."""

    from headperturb.core import kinds
    from headperturb.core.spec import HeadJob, Job
    from headperturb.model import headjob

    model, engine, ids, _ = setup
    sites = locate_sites(model)
    rows = {
        (r["site"], r["layer"], r["head"]): r["rms"]
        for r in engine.baseline(ids, sites, batch_size=4).head_rms
    }
    assert len(rows) == 2 * 2 * 4  # both sites, 2 layers, 4 heads
    seen = []
    proj = model.get_submodule(sites[1].module_name)
    handle = proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0][0].clone()))
    with torch.no_grad():
        for x in ids:
            model(input_ids=torch.tensor(x[None]))
    handle.remove()
    z = torch.cat(seen)  # (all positions of all prompts, 4 * 8)
    for head in range(4):
        expected = z[:, head * 8 : (head + 1) * 8].pow(2).mean().sqrt().item()
        assert rows[("o_proj_input", 1, head)] == pytest.approx(expected, rel=1e-4)
    files.write_parquet(
        tmp_path / "rms.parquet",
        [{"site": k[0], "layer": k[1], "head": k[2], "rms": v} for k, v in rows.items()],
    )
    target = HeadJob("o_proj_input", "all", "noise", "2", 1, 3)
    for mode, sigma in (("absolute", 2.0), ("relative", 2.0 * rows[("o_proj_input", 1, 3)])):
        job = Job(target, kinds.Noise(scale=2.0, noise_mode=mode))
        resolved = headjob.resolve(job, tmp_path / "rms.parquet")
        assert resolved.perturbation.sigma == pytest.approx(sigma)
        assert resolved.settings()["sigma"] == pytest.approx(sigma)
