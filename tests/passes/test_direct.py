"""Direct effects (headperturb.model.direct): the decomposition of the margin into heads and the
rest holds in every supported family, and a head whose effect a later component cancels shows a
direct effect much larger than its total effect (self-repair)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from headperturb.core import kinds
from headperturb.core.kinds import Zero
from headperturb.model import direct, passes, tail
from headperturb.model.hooks import Edit, edited, site_slice
from headperturb.model.sites import locate_sites, post_attention_norm


def _margins(logits: np.ndarray) -> np.ndarray:
    return logits[..., 1] - logits[..., 0]


@contextlib.contextmanager
def _no_softcap(model):
    """The model's logits before Gemma 2's soft-capping (direct effects are on those)."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    model.config.final_logit_softcapping = None
    try:
        yield
    finally:
        model.config.final_logit_softcapping = cap


def _attention_writes(model, engine, ids, sites) -> dict[int, np.ndarray]:
    """Per layer, (n, d_model): what the attention sublayer adds to the residual stream at each
    prompt's final position (after the post-attention norm in the families that have one),
    recorded with plain torch hooks, independently of headperturb's."""
    seen, handles = {}, []
    for site in sites:
        post = post_attention_norm(model, site)
        module = post if post is not None else model.get_submodule(site.module_name)

        def grab(_m, _a, out, layer=site.layer):
            seen[layer] = out[0, -1].detach().double()

        handles.append(module.register_forward_hook(grab))
    out = {site.layer: [] for site in sites}
    try:
        for x in ids:
            passes.full(engine, x)
            for layer in out:
                out[layer].append(seen[layer])
    finally:
        for h in handles:
            h.remove()
    return {layer: torch.stack(rows) for layer, rows in out.items()}


def test_margin_decomposes_into_heads_and_the_rest(family_setup):
    """The recorded final residual stream through the frozen final norm gives the model's margin
    (before soft-capping), and each layer's attention write, read along the margin's direction,
    is the sum of its heads' direct contributions (z . g) plus the projection's bias: so the margin
    is the sum of every head's direct effect and the other components (embeddings, MLPs, biases)."""
    model, engine, ids, _pids, recorded, _before = family_setup
    sites = locate_sites(model)
    state = recorded.final_state
    with _no_softcap(model):
        margins = _margins(np.stack([passes.full(engine, x)[0] for x in ids]))
        np.testing.assert_allclose(
            direct.predicted_margin(model, engine.token_ids, state["resid_final"]),
            margins,
            atol=1e-4,
        )
        writes = _attention_writes(model, engine, ids, sites)
    u = direct.readout(model, engine.token_ids, state["resid_final"])
    grads = direct.gradients(model, sites, engine.token_ids, state)
    sums = direct.head_sums(grads, state, sites)
    for j, site in enumerate(sites):
        along = (writes[site.layer] * u).sum(-1).numpy()
        proj = model.get_submodule(site.module_name)
        bias = getattr(proj, "bias", None)
        bias_part = 0.0
        if isinstance(bias, torch.Tensor):
            post = post_attention_norm(model, site)
            v = (
                u
                if post is None
                else direct.FrozenNorm.of(post).pullback(u, state[f"out.{site.layer}"])
            )
            bias_part = (v * bias.detach().double()).sum(-1).numpy()
        np.testing.assert_allclose(sums["z_dot_g"][:, j].sum(-1) + bias_part, along, atol=1e-4)
    assert np.abs(sums["z_dot_g"]).max() > 1e-3  # the heads write something along the margin


def test_direct_effect_of_a_last_layer_head_is_its_total_with_the_norm_and_mlp_frozen(family_setup):
    """At the last layer the direct path is the whole path once the final norm's scale (and the
    post-attention norm's), and the last MLP's output, are held at their unperturbed values: zero
    ablation of the final position then changes the margin by exactly the direct effect."""
    model, engine, ids, pids, recorded, _before = family_setup
    sites = locate_sites(model)
    site, head = sites[-1], 1
    state = recorded.final_state
    sums = direct.head_sums(direct.gradients(model, sites, engine.token_ids, state), state, sites)
    de = kinds.build("zero").first_order(sums)[:, -1, head]
    layer = model.get_submodule(site.layers_path)[site.layer]
    mlp = next(
        m
        for name in ("mlp", "feed_forward", "fc2")
        if (m := getattr(layer, name, None)) is not None
    )
    norms = [model.get_submodule(direct.final_norm_name(model))]
    post = post_attention_norm(model, site)
    norms += [post] if post is not None else []
    clean, handles = {}, []

    def freeze_norm(module, args, out, key):
        x = args[0]
        if key not in clean:  # the unperturbed pass: remember the scale
            clean[key] = direct.FrozenNorm.of(module).scale(
                x[:, -1:].reshape(-1, x.shape[-1]).float()
            )
            return None
        fn = direct.FrozenNorm.of(module)
        s = clean[key]
        y = (
            fn.weight.double()
            * (x.double() - (x.double().mean(-1, keepdim=True) if fn.centered else 0))
            / s
        )
        return (y + (fn.bias.double() if fn.bias is not None else 0)).to(out.dtype)

    def freeze_mlp(_m, _a, out):
        if "mlp" not in clean:
            clean["mlp"] = out.detach().clone()
            return None
        return clean["mlp"]

    with _no_softcap(model):
        changes = []
        for i, x in enumerate(ids):
            clean.clear()
            handles = [
                n.register_forward_hook(lambda m, a, o, k=k: freeze_norm(m, a, o, k))
                for k, n in enumerate(norms)
            ]
            handles.append(mlp.register_forward_hook(freeze_mlp))
            try:
                before = _margins(passes.full(engine, x))[0]
                cols = site_slice(model, site, head, "o_proj_input")
                zeros = kinds.build("zero").values(
                    seed=0, layer=site.layer, head=head, width=cols.stop - cols.start, repeats=1
                )
                edit = Edit(site, head, "o_proj_input", zeros, Zero.apply, 1, "last")
                with edited(model, edit, (edit.for_prompt(i, pids[i], len(x)),)):
                    after = _margins(passes.full(engine, x))[0]
            finally:
                for h in handles:
                    h.remove()
            changes.append(after - before)
    np.testing.assert_allclose(de, changes, atol=1e-4)
    assert np.abs(de).max() > 1e-3


def test_a_cancelled_head_has_a_direct_effect_much_larger_than_its_total(llama_setup):
    """Plant self-repair: the next layer's MLP output subtracts head 0 of layer 0's write at every
    position (an idealised backup). Zero-ablating that head at the final position then barely
    moves the margin, while its direct effect stays what the head writes along the margin."""
    model, engine, ids, pids, _recorded, _before = llama_setup
    sites = locate_sites(model)
    site, head = sites[0], 0
    cols = site_slice(model, site, head, "o_proj_input")
    proj = model.get_submodule(site.module_name)
    with torch.no_grad():
        saved = proj.weight[:, cols].clone()
        proj.weight[:, cols] *= 30.0  # a loud head
    written = {}

    def grab(_m, args, _out):
        written["w"] = args[0][..., cols] @ proj.weight[:, cols].T

    mlp = model.get_submodule(site.layers_path)[1].mlp
    handles = [
        proj.register_forward_hook(grab),
        mlp.register_forward_hook(lambda _m, _a, out: out - written["w"]),
    ]
    try:
        recorded = engine.baseline(ids, sites, batch_size=3)
        state = recorded.final_state
        sums = direct.head_sums(
            direct.gradients(model, sites, engine.token_ids, state), state, sites
        )
        de = kinds.build("zero").first_order(sums)[:, 0, head]
        zeros = kinds.build("zero").values(
            seed=0, layer=0, head=head, width=cols.stop - cols.start, repeats=1
        )
        edit = Edit(site, head, "o_proj_input", zeros, Zero.apply, 1, "last")
        total = _margins(passes.naive(engine, ids, pids, edit)[:, 0]) - _margins(recorded.logits)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            proj.weight[:, cols] = saved
    assert np.abs(de).mean() > 5 * np.abs(total).mean()
    assert np.abs(de).mean() > 0.05


def test_direct_effects_refuse_a_state_without_the_final_residual(family_setup):
    model, engine, _ids, _pids, recorded, _before = family_setup
    state = {k: v for k, v in recorded.final_state.items() if k != "resid_final"}
    with pytest.raises(direct.DirectEffectError, match="no resid_final.*--forcerun baseline"):
        direct.gradients(model, locate_sites(model), engine.token_ids, state)


def test_final_state_layers_are_what_tail_reads(family_setup):
    """The final state gained ``resid_final``; a layer's view of it is unchanged."""
    model, _engine, _ids, _pids, recorded, _before = family_setup
    layer = tail.layer_state(recorded.final_state, 1)
    assert set(layer) == {"resid", "z", "out", "n_tokens"}
