"""Every supported family, located without guessing, on tiny random models (no download):

(a) the site's input has shape (batch, seq, heads * head_dim);
(b) the per-head slices times the matching projection columns, plus the bias, sum to its output;
(c) perturbing head h changes only slice h.
The fast engine's equivalence with the naive hook path per family is in test_equivalence.py.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, build_tiny_model, capture_io, head_slice, projection_weight

from headperturb.core.kinds import make_noise
from headperturb.model.hooks import perturb_head
from headperturb.model.sites import locate_sites

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11, 60, 61]])


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory, tiny_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    folder = build_tiny_model(
        tmp_path_factory.mktemp(request.param),
        tiny_tokenizer_dir,
        request.param,
        seed=2,
        n_layers=3,
    )
    return request.param, AutoModelForCausalLM.from_pretrained(folder).eval()


def _io(model, name, ids=IDS):
    return capture_io(model, name, ids)


def test_site_shape_and_decomposition(family_model):
    family, model = family_model
    sites = locate_sites(model)
    assert len(sites) == 3
    site = sites[1]
    expected_head_dim = 16 if family in ("qwen3", "gemma2", "gemma3_text") else 8
    assert (site.n_heads, site.head_dim) == (4, expected_head_dim)
    x, y = _io(model, site.module_name)
    assert x.shape == (1, IDS.shape[1], 4 * expected_head_dim)
    module = model.get_submodule(site.module_name)
    weight = projection_weight(model, site)
    bias = module.bias if getattr(module, "bias", None) is not None else 0
    total = (
        sum(x[..., head_slice(site, h)] @ weight[:, head_slice(site, h)].T for h in range(4)) + bias
    )
    torch.testing.assert_close(total, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head", [0, 2])
def test_perturbing_head_h_changes_only_slice_h(family_model, head):
    _, model = family_model
    site = locate_sites(model)[1]
    clean, _ = _io(model, site.module_name)
    noise = make_noise(
        seed=0,
        layer=1,
        head=head,
        scale=2.0,
        draws=1,
        prompt=0,
        length=IDS.shape[1],
        width=site.head_dim,
    )
    with perturb_head(model, site, head, noise):  # capture_io's hook sees the noise hook's result
        noisy, _ = capture_io(model, site.module_name, IDS)
    diff = (noisy - clean).abs()[0]
    assert [bool((diff[:, head_slice(site, k)] > 0).any()) for k in range(4)] == [
        k == head for k in range(4)
    ]
