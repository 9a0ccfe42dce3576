"""The screen (headperturb.model.gradients, headperturb.analysis.screen): its numbers against
plain autograd, a planted decisive head, the choice of heads to measure and the agreement with
exact measurements."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import edit_of, head_slice, sentiment_prompts

from headperturb.analysis import screen
from headperturb.core.kinds import mean_from_end
from headperturb.data.parts import Prefix
from headperturb.model import gradients, passes
from headperturb.model.engine import Engine
from headperturb.model.sites import locate_sites


def _setup(model, tok, imdb_sample, n_test=6):
    train, test = imdb_sample
    built = sentiment_prompts(train, test, tok, k_shot=2, n_test=n_test, max_review_tokens=15)
    engine = Engine(model, built.info["prefix_len"], built.info["verbalizer_token_ids"])
    ids = [np.asarray(x) for x in built.prompts["input_ids"]]
    return engine, ids, built.prompts["prompt_id"].tolist(), built.prompts["label"].to_numpy()


def test_head_means_are_the_mean_ablations_values(tiny_llama, imdb_sample):
    model, tok = tiny_llama
    engine, ids, _pids, _labels = _setup(model, tok, imdb_sample)
    ids = ids[:3] + [ids[3][:-4]]  # prompts of unequal length
    sites = locate_sites(model)
    means = gradients.head_means(engine, ids, sites, batch_size=3)
    for site in sites:
        clean = [passes.clean_outputs(engine, ids, site, h, "o_proj_input") for h in range(4)]
        expected = torch.cat([mean_from_end(c) for c in clean], dim=1)
        torch.testing.assert_close(means[site.layer], expected, atol=1e-6, rtol=1e-6)


def test_screen_numbers_equal_plain_autograd(tiny_llama, imdb_sample):
    """sum z.g, sum mean.g and ||g|| of every head, against a margin differentiated by hand with
    torch.autograd on one prompt at a time; over all positions, the last, the label words and
    one demonstration (positions placed by hand)."""
    model, tok = tiny_llama
    engine, ids, _pids, _labels = _setup(model, tok, imdb_sample, n_test=4)
    ids = ids[:2] + [ids[2][:-3], ids[3]]
    sites = locate_sites(model)
    means = gradients.head_means(engine, ids, sites)
    p = engine.prefix_len
    prefix = Prefix(p, (2, p - 1), ((0, p // 2), (p // 2, p)))
    positions = ("all", "last", "label_words", "demonstration_2")
    partners = [0, -1, 2, 3]  # each its own partner (patching from itself changes nothing)
    sums = gradients.gradient_sums(
        engine, ids, sites, means, positions=positions, prefix=prefix, partners=partners
    )
    for part in positions:  # the partner's own forward pass gives the outputs the gradient's did
        own, partner = sums[f"z_dot_g.{part}"], sums[f"partner_dot_g.{part}"]
        np.testing.assert_allclose(partner[[0, 2, 3]], own[[0, 2, 3]], rtol=1e-5, atol=1e-9)
        assert np.isnan(partner[1]).all()
    neg, pos = engine.token_ids
    zs = {}
    handles = []
    for i, x in enumerate(ids):
        zs.clear()
        handles = [
            model.get_submodule(s.module_name).register_forward_pre_hook(
                lambda _m, a, k=s.layer: zs.__setitem__(k, a[0])
            )
            for s in sites
        ]
        embeds = model.get_input_embeddings()(torch.tensor(x[None])).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds).logits[0, -1]
        for h in handles:
            h.remove()
        grads = torch.autograd.grad(logits[pos] - logits[neg], [zs[s.layer] for s in sites])
        for s, g in zip(sites, grads):
            z, g = zs[s.layer][0].detach(), g[0]
            mu = means[s.layer][-len(x) :]
            for head in range(4):
                cols = head_slice(s, head)
                expected = {
                    "z_dot_g.all": (z[:, cols] * g[:, cols]).sum(),
                    "z_dot_g.last": (z[-1, cols] * g[-1, cols]).sum(),
                    "mean_dot_g.all": (mu[:, cols] * g[:, cols]).sum(),
                    "g_norm.all": g[:, cols].pow(2).sum().sqrt(),
                    "g_norm.last": g[-1, cols].pow(2).sum().sqrt(),
                    "z_dot_g.label_words": (z[[2, p - 1], cols] * g[[2, p - 1], cols]).sum(),
                    "mean_dot_g.demonstration_2": (
                        mu[p // 2 : p, cols] * g[p // 2 : p, cols]
                    ).sum(),
                }
                for key, value in expected.items():
                    assert sums[key][i, s.layer, head] == pytest.approx(
                        float(value), rel=1e-4, abs=1e-7
                    ), key


def test_first_order_estimates_track_exact_ablations_and_noise_spread(tiny_llama, imdb_sample):
    model, tok = tiny_llama
    engine, ids, pids, labels = _setup(model, tok, imdb_sample)
    sites = locate_sites(model)
    sums = gradients.gradient_sums(engine, ids, sites, gradients.head_means(engine, ids, sites))
    base = engine.score(ids)
    margin = base[:, 1] - base[:, 0]
    plan = [("zero", "all", "", None), ("mean", "last", "", None), ("noise", "all", "2", 2.0)]
    frame = pd.DataFrame(screen.estimates(sums, pids, labels, margin, [0, 1], plan))
    assert len(frame) == 3 * len(ids) * 2 * 4
    zero = frame[(frame["kind"] == "zero") & (frame["layer"] == 1)]
    exact = []
    for head in range(4):
        out = passes.naive(engine, ids, pids, edit_of(model, sites[1], head, "zero"))[:, 0]
        exact.append((out[:, 1] - out[:, 0]) - margin)
    est = zero.sort_values(["head", "prompt_id"])["margin_change"].to_numpy()
    assert np.corrcoef(est, np.concatenate(exact))[0, 1] > 0.95
    noise = frame[frame["kind"] == "noise"]
    np.testing.assert_allclose(noise["margin_change"], 2.0 * sums["g_norm.all"].reshape(-1))
    assert noise["accuracy"].abs().max() <= 1 and (noise["logit_diff"] == 0).all()


def test_a_planted_decisive_head_ranks_first_with_the_sign_of_its_exact_effect(
    tmp_path, tiny_tokenizer_dir, imdb_sample
):
    """Head 1 of the last of four layers made decisive (its o_proj columns scaled by 10, so that
    zeroing it flips most answers): the screen ranks it first among all 16 heads, with the sign
    of its exact zero-ablation change. (Scaled by 20 its output saturates the final norm and
    the first-order estimate falls behind: the screen chooses, the exact jobs measure.)"""
    from tiny_models import build_tiny_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_tiny_model(tmp_path / "llama", tiny_tokenizer_dir, "llama", seed=1, n_layers=4)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    sites = locate_sites(model)
    with torch.no_grad():
        model.get_submodule(sites[3].module_name).weight[:, head_slice(sites[3], 1)] *= 10.0
    engine, ids, pids, _ = _setup(
        model, AutoTokenizer.from_pretrained(folder), imdb_sample, n_test=12
    )
    base = engine.score(ids)
    margin = base[:, 1] - base[:, 0]
    labels = (margin > 0).astype(int)  # the model's own answers: the baseline is always right
    sums = gradients.gradient_sums(engine, ids, sites, gradients.head_means(engine, ids, sites))
    estimates = screen.estimates(
        sums, pids, labels, margin, [0, 1, 2, 3], [("zero", "all", "", None)]
    )
    heads = screen.per_head(pd.DataFrame(estimates))
    first = heads.iloc[0]
    assert (first["layer"], first["head"], first["rank"]) == (3, 1, 1)
    out = passes.naive(engine, ids, pids, edit_of(model, sites[3], 1, "zero"))[:, 0]
    assert np.mean(((out[:, 1] - out[:, 0]) > 0).astype(int) != labels) >= 0.5  # decisive
    ld = np.where(labels == 1, 1, -1)
    exact = np.mean(ld * margin - ld * (out[:, 1] - out[:, 0]))  # baseline - perturbed
    assert exact > 0 and np.sign(first["est_logit_diff"]) == np.sign(exact)


def test_choose_takes_the_largest_estimates_and_a_seeded_sample_of_the_rest():
    frame = pd.DataFrame(
        [
            {
                "prompt_id": prompt,
                "kind": "zero",
                "scale": "",
                "position": "all",
                "layer": layer,
                "head": head,
                "margin_change": 0.0,
                "accuracy": 0.0,
                "logit_diff": (layer * 4 + head) * (1 if head % 2 else -1) / 100,
            }
            for prompt in range(2)
            for layer in range(3)
            for head in range(4)
        ]
    )
    heads = screen.per_head(frame)
    top = screen.choose(heads, [0, 1, 2], "all", top=3, random=0, seed=0)
    assert top == {2: [1, 2, 3]}  # |estimates| 0.11, 0.10, 0.09
    sample = screen.choose(heads, [0, 1, 2], "all", top=3, random=2, seed=0)
    assert screen.choose(heads, [0, 1, 2], "all", top=3, random=2, seed=0) == sample
    extra = sorted(
        (lay, h)
        for lay, hs in sample.items()
        for h in hs
        if (lay, h) not in {(2, 1), (2, 2), (2, 3)}
    )
    assert len(extra) == 2
    assert screen.choose(heads, [0], "all", top=2, random=0, seed=0) == {0: [2, 3]}


def test_agreement_compares_each_head_measured_both_ways():
    heads = pd.DataFrame(
        {
            "kind": "zero",
            "scale": "",
            "position": "last",
            "layer": [1] * 4,
            "head": range(4),
            "est_logit_diff": [0.1, 0.2, 0.3, -0.05],
        }
    )
    table = pd.DataFrame(
        {
            "kind": "zero",
            "position": "last",
            "layer": [1] * 4,
            "head": range(4),
            "change_logit_diff": [0.11, 0.22, 0.2, 0.04],
        }
    )
    summary, disagree = screen.agreement(table, heads, threshold=0.05)
    row = summary[summary["layer"] == 1].iloc[0]
    assert row["heads"] == 4 and row["spearman"] == pytest.approx(0.8)
    assert row["sign_agreement"] == 0.75
    assert row["largest_miss"] == pytest.approx(0.1) and row["largest_miss_head"] == "L1H2"
    assert disagree["head"].tolist() == [2, 3]
