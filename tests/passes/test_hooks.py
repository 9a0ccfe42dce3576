"""The per-head site and the noise hook, on a tiny random Llama (2 layers, 4 query heads, 2 KV
heads)."""

import pytest
import torch
from tiny_models import capture_io, head_slice, projection_weight

from headperturb.core.kinds import make_noise
from headperturb.model.hooks import perturb_head
from headperturb.model.sites import SiteError, locate_sites

_capture = capture_io


IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11]])


def test_sites_are_query_heads_at_the_o_proj_input(tiny_llama):
    model, _ = tiny_llama
    sites = locate_sites(model)
    assert [s.module_name for s in sites] == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.self_attn.o_proj",
    ]
    assert {(s.n_heads, s.head_dim) for s in sites} == {(4, 8)}  # 4 query heads, not the 2 KV heads
    x, _ = _capture(model, sites[1].module_name, IDS)
    assert x.shape == (1, IDS.shape[1], 4 * 8)


def test_head_slices_times_o_proj_columns_sum_to_the_o_proj_output(tiny_llama):
    model, _ = tiny_llama
    site = locate_sites(model)[1]
    x, y = _capture(model, site.module_name, IDS)
    weight = projection_weight(model, site)
    total = sum(
        x[..., head_slice(site, h)] @ weight[:, head_slice(site, h)].T for h in range(site.n_heads)
    )
    torch.testing.assert_close(total, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", [0, 3])
def test_perturbing_head_h_changes_only_slice_h(tiny_llama, head):
    model, _ = tiny_llama
    site = locate_sites(model)[0]
    clean, _ = _capture(model, site.module_name, IDS)
    noise = make_noise(
        seed=0, layer=0, head=head, scale=2.0, draws=1, prompt=0, length=IDS.shape[1], width=8
    )
    with perturb_head(model, site, head, noise):
        # capture what o_proj really receives: a hook registered after the noise hook sees its
        # result
        noisy, _ = _capture(model, site.module_name, IDS)
    diff = (noisy - clean).abs()[0]
    changed = [bool((diff[:, head_slice(site, k)] > 0).any()) for k in range(4)]
    assert changed == [k == head for k in range(4)]
    torch.testing.assert_close(
        noisy[..., head_slice(site, head)] - clean[..., head_slice(site, head)], noise
    )


def test_hook_is_removed_after_the_block_even_on_error(tiny_llama):
    model, _ = tiny_llama
    site = locate_sites(model)[1]
    with torch.no_grad():
        before = model(input_ids=IDS).logits
    noise = make_noise(
        seed=0, layer=1, head=1, scale=5.0, draws=1, prompt=0, length=IDS.shape[1], width=8
    )
    with pytest.raises(RuntimeError, match="boom"):
        with perturb_head(model, site, 1, noise):
            with torch.no_grad():
                during = model(input_ids=IDS).logits
            raise RuntimeError("boom")
    with torch.no_grad():
        after = model(input_ids=IDS).logits
    assert not torch.allclose(before, during)
    assert torch.equal(before, after)
    assert not model.get_submodule(site.module_name)._forward_pre_hooks


def test_o_proj_output_site_perturbs_residual_coordinates(tiny_llama):
    model, _ = tiny_llama
    site = locate_sites(model)[1]
    _, clean = _capture(model, site.module_name, IDS)
    noise = make_noise(
        seed=0, layer=1, head=2, scale=1.0, draws=1, prompt=0, length=IDS.shape[1], width=8
    )
    with perturb_head(model, site, 2, noise, where="o_proj_output"):
        _, noisy = _capture(model, site.module_name, IDS)
    torch.testing.assert_close(noisy - clean, torch.nn.functional.pad(noise, (16, 8)))


def test_noise_is_seeded_per_draw_and_scaled():
    a = make_noise(seed=1, layer=2, head=3, scale=2.0, draws=3, prompt=4, length=5, width=6)
    b = make_noise(seed=1, layer=2, head=3, scale=2.0, draws=2, prompt=4, length=5, width=6)
    assert torch.equal(a[:2], b)  # a draw does not depend on how many draws are asked for
    assert not torch.equal(a[0], a[1])
    other_scale = make_noise(
        seed=1, layer=2, head=3, scale=1.0, draws=3, prompt=4, length=5, width=6
    )
    assert not torch.allclose(a, 2 * other_scale)  # the scale is part of the seed, as specified
    big = make_noise(seed=0, layer=0, head=0, scale=2.0, draws=1, prompt=0, length=200, width=64)
    assert abs(float(big.std()) - 2.0) < 0.05 and abs(float(big.mean())) < 0.05


def test_unknown_architecture_names_the_keys(tiny_llama):
    model, _ = tiny_llama
    model.config.model_type = "mystery"
    try:
        with pytest.raises(
            SiteError, match="model_type 'mystery'.*model.site.layers.*model.site.proj"
        ):
            locate_sites(model)
        sites = locate_sites(model, {"layers": "model.layers", "proj": "self_attn.o_proj"})
        assert len(sites) == 2 and sites[0].n_heads == 4
    finally:
        model.config.model_type = "llama"


def test_no_hook_is_registered_outside_the_hook_point_module():
    """Every edit, recording and gradient capture goes through headperturb.model.hooks."""
    import re
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "src" / "headperturb"
    registering = re.compile(r"register_(forward|full_backward|backward)\w*hook|\.register_hook\(")
    found = [
        str(p.relative_to(src))
        for p in src.rglob("*.py")
        if registering.search(p.read_text()) and p.relative_to(src) != Path("model/hooks.py")
    ]
    assert found == []
    assert registering.search((src / "model/hooks.py").read_text())


def test_hook_points_have_transformer_lens_names():
    from headperturb.model import hooks

    assert hooks.point_name("hook_z", 3) == "blocks.3.attn.hook_z"
    assert hooks.point_name("hook_resid_pre", 0) == "blocks.0.hook_resid_pre"
    assert hooks.point_name("hook_attn_out", 2) == "blocks.2.hook_attn_out"
    assert hooks.point_name("hook_embed") == "hook_embed"
    assert hooks.point_name("hook_resid_final") == "hook_resid_final"
    with pytest.raises(
        ValueError,
        match="allowed: hook_embed, hook_resid_pre, hook_z, hook_attn_out, hook_resid_final",
    ):
        hooks.point_name("hook_q", 1)
