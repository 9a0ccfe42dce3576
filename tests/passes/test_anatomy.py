"""What kind of head each one is (headperturb.model.attention, headperturb.model.writes): the
attention weights read are the model's own, computed again here from the queries and keys it
hands its attention (in every supported family); the type scores find a planted induction head;
what a head writes equals a naive logit lens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headperturb.analysis.anatomy import TYPE_SCORES
from headperturb.model import attention, writes
from headperturb.model.sites import locate_sites


def _reference_rows(model, ids) -> torch.Tensor:
    """(n_layers, n_heads, n_tokens): every head's weights from the last position, computed
    from the queries, keys, mask, scaling and soft-capping the model passes its attention
    function (softmax of q.k x scaling, capped, masked), by a function registered here."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import repeat_kv
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    rows = []

    def reference(module, query, key, value, attention_mask, scaling=None, softcap=None, **kw):
        key = repeat_kv(key, query.shape[1] // key.shape[1]).double()
        value = repeat_kv(value, query.shape[1] // value.shape[1])
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        scores = query.double() @ key.transpose(-1, -2) * scaling
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is not None:
            mask = attention_mask[..., : key.shape[-2]]
            scores = (
                scores.masked_fill(~mask, -torch.inf)
                if mask.dtype == torch.bool
                else (scores + mask.double())
            )
        weights = torch.softmax(scores, -1)
        rows.append(weights[0, :, -1])
        out = (weights.to(value.dtype) @ value).transpose(1, 2).contiguous()
        return out, None

    AttentionInterface.register("headperturb_reference", reference)
    AttentionMaskInterface.register("headperturb_reference", eager_mask)  # additive, 0: attend
    before = model.config._attn_implementation
    model.set_attn_implementation("headperturb_reference")
    try:
        with torch.no_grad():
            model(input_ids=torch.as_tensor(np.asarray(ids))[None])
    finally:
        model.set_attn_implementation(before)
    return torch.stack(rows)


def test_attention_weights_are_the_models_own_and_shares_sum_to_one(family_setup):
    model, engine, ids, _pids, _recorded, _before = family_setup
    before = model.config._attn_implementation
    found = list(attention.final_rows(model, ids, engine.prefix_len))
    assert model.config._attn_implementation == before  # switched back after reading
    for x, rows in zip(ids, found):
        reference = _reference_rows(model, x)
        assert rows.shape == reference.shape == (len(locate_sites(model)), 4, len(x))
        assert torch.allclose(rows, reference, atol=1e-5)
        shares = attention.part_shares(rows, np.arange(len(x)) % 3, 3)
        assert np.allclose(shares.sum(-1), 1.0, atol=1e-6)


FINAL_NORM = {"gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm"}
"""The final norm of the families whose norm is not ``model.norm`` (OPT's: ``model.decoder``)."""


def _naive_lens(model, site, head: int, state: dict) -> torch.Tensor:
    """(n, vocab) what head ``head`` of ``site`` writes at the final position, read at the
    unembedding by the model's modules: its output through the projection called on its slice
    alone (bias cancelled), Gemma's norm after attention and the final norm with their scales
    held at the unperturbed values, then the output embedding (after OPT's project_out)."""
    family = model.config.model_type
    z = state[f"z.{site.layer}"].float()
    keep = torch.zeros_like(z)
    columns = slice(head * site.head_dim, (head + 1) * site.head_dim)
    keep[:, columns] = z[:, columns]
    o_proj = model.get_submodule(site.module_name)
    o = (o_proj(keep) - o_proj(torch.zeros_like(keep))).double()
    if family.startswith("gemma"):  # the norm after attention: RMSNorm with weight 1 + w
        post = model.model.layers[site.layer].post_attention_layernorm
        out = state[f"out.{site.layer}"].double()
        o = o * (out.pow(2).mean(-1, keepdim=True) + post.eps).rsqrt() * (1 + post.weight.double())
    resid = state["resid_final"].double()
    if family in ("gpt2", "gpt_neox", "opt"):  # LayerNorm: centred, the biased variance
        name = FINAL_NORM.get(family, "model.decoder.final_layer_norm")
        norm = model.get_submodule(name)
        var = resid.var(-1, unbiased=False, keepdim=True)
        normed = (o - o.mean(-1, keepdim=True)) / (var + norm.eps).sqrt() * norm.weight.double()
    else:  # RMSNorm (Gemma's weight is 1 + w)
        norm = model.get_submodule("model.norm")
        eps = getattr(norm, "variance_epsilon", None) or norm.eps
        weight = norm.weight.double() + (1 if family.startswith("gemma") else 0)
        normed = o * (resid.pow(2).mean(-1, keepdim=True) + eps).rsqrt() * weight
    project_out = getattr(getattr(model, "model", None), "decoder", None)
    project_out = getattr(project_out, "project_out", None)
    if project_out is not None:
        normed = normed.float() @ project_out.weight.T
    return model.get_output_embeddings()(normed.float()).double()


def test_what_a_head_writes_equals_a_naive_logit_lens(family_setup):
    """The head's output through its own columns of the output projection (called on its slice
    alone), the norms with the prompt's scales and the output embedding, by modules, in every
    family: the promoted tokens and the label gap of the mean write."""
    model, engine, _ids, _pids, recorded, _before = family_setup
    sites, state = locate_sites(model), recorded.final_state
    labels = np.arange(state["resid_final"].shape[0]) % 2
    rows = writes.read_writes(model, sites, state, labels, engine.token_ids, top=5)
    for site, head in ((sites[-1], 1), (sites[0], 2)):
        with torch.no_grad():
            mean_logits = _naive_lens(model, site, head, state).mean(0)
        row = next(
            r for r in rows if (r["layer"], r["head"], r["write"]) == (site.layer, head, "mean")
        )
        assert row["promoted"] == torch.argsort(mean_logits, descending=True)[:5].tolist()
        negative, positive = engine.token_ids
        gap = float(mean_logits[positive] - mean_logits[negative])
        assert row["label_gap"] == pytest.approx(gap, rel=1e-4, abs=1e-6)


def _planted_induction(vocab: int = 200, length: int = 24):
    """A 2-layer GPT-2 whose layer 0 head 0 attends to the previous position and writes that
    token into a subspace of its own, and whose layer 1 head 0 attends where that subspace holds
    the current token: an induction head built by hand (every other weight zero, the norms'
    weights one; one-hot tokens, positions and previous tokens in subspaces of their own)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    n_pos, d, head_dim = 2 * length + 1, 512, 256
    config = GPT2Config(
        vocab_size=vocab,
        n_embd=d,
        n_layer=2,
        n_head=2,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).eval()
    tok, pos, prev = 0, vocab, vocab + 64  # the subspaces: token, position, previous token
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for block in model.transformer.h:
            block.ln_1.weight.fill_(1.0)
            block.ln_2.weight.fill_(1.0)
        model.transformer.ln_f.weight.fill_(1.0)
        model.transformer.wte.weight[:, tok:vocab] = torch.eye(vocab)
        model.transformer.wpe.weight[:, pos : pos + 64] = torch.eye(64)
        q0 = model.transformer.h[0].attn.c_attn.weight  # (d, 3d): q, k, v columns
        c0 = model.transformer.h[0].attn.c_proj.weight  # (d, d)
        for i in range(n_pos):
            q0[pos + i, i] = 4.0  # position i asks for ...
            if i + 1 < head_dim:
                q0[pos + i, d + i + 1] = 4.0  # ... the key of position i - 1
        for t in range(vocab):
            q0[tok + t, 2 * d + t] = 1.0  # value: the token
            c0[t, prev + t] = 1.0  # written to the previous-token subspace
        q1 = model.transformer.h[1].attn.c_attn.weight
        for t in range(vocab):
            q1[tok + t, t] = 4.0  # query: the current token
            q1[prev + t, d + t] = 4.0  # key: the previous token there
    return model


def test_a_planted_induction_head_scores_high_and_random_heads_near_chance(llama_setup):
    length = 24
    model = _planted_induction(length=length)
    sequences = attention.repeated_tokens(list(range(1, 200)), [0], length, 8, seed=0)
    scores = np.stack(
        [attention.pattern_scores(attention.patterns(model, s), 1, length) for s in sequences]
    ).mean(0)
    induction = TYPE_SCORES.index("induction")
    previous = TYPE_SCORES.index("previous_token")
    assert scores[1, 0, induction] >= 0.9  # 0.96: repeats within a sequence share the rest
    assert scores[0, 0, previous] >= 0.9
    assert scores[1, 1, induction] < 0.3  # the zero head attends evenly
    random_model = llama_setup[0]
    n_vocab = random_model.get_output_embeddings().weight.shape[0]
    sequences = attention.repeated_tokens(list(range(n_vocab)), [], length, 4, seed=0)
    found = np.stack(
        [
            attention.pattern_scores(attention.patterns(random_model, s), 0, length)
            for s in sequences
        ]
    ).mean(0)
    assert found[..., induction].max() < 0.3  # chance: about one over the positions attended


def test_the_function_vector_score_equals_a_naive_hook(family_setup):
    """A head's mean clean final-position output patched into prompts with shuffled
    demonstration labels: the fast score (final token alone above the head) against full forward
    passes with a plain forward pre-hook on the output projection."""
    from headperturb.analysis.stats import correct_logit_diff
    from headperturb.data.parts import LABEL_WORDS, TEMPLATE
    from headperturb.model import function_vectors as fv
    from headperturb.model.hooks import site_slice

    model, engine, ids, _pids, recorded, _before = family_setup
    sites = locate_sites(model)
    first = np.asarray(ids[0])
    is_label = np.isin(first, engine.token_ids) & (np.arange(len(first)) < engine.prefix_len)
    parts = np.where(is_label, LABEL_WORDS, TEMPLATE)
    corrupted = fv.shuffled_labels(ids, parts, engine.prefix_len, seed=0)
    assert not np.array_equal(corrupted[0][0], first) and corrupted[1] == engine.prefix_len
    labels = np.arange(len(ids)) % 2
    fast = fv.scores(engine, sites, recorded.final_state, corrupted, labels)
    negative, positive = engine.token_ids

    def ld(x, site=None, cols=None, value=None):
        handle = None
        if site is not None:

            def set_last(_module, args):
                z = args[0].clone()
                z[0, -1, cols] = value
                return (z, *args[1:])

            module = model.get_submodule(site.module_name)
            handle = module.register_forward_pre_hook(set_last)
        try:
            with torch.no_grad():
                logits = model(input_ids=torch.as_tensor(x)[None]).logits[0, -1].double()
        finally:
            if handle is not None:
                handle.remove()
        return float(logits[positive] - logits[negative])

    for site, head in [(sites[0], 1), (sites[-1], 2)]:
        cols = site_slice(model, site, head, "o_proj_input")
        z = recorded.final_state[f"z.{site.layer}"][:, cols].mean(0)
        for i, x in enumerate(corrupted[0]):
            gain = ld(x, site, cols, z) - ld(x)
            naive = correct_logit_diff(labels[i : i + 1], np.array([gain]))[0]
            j = [s.layer for s in sites].index(site.layer)
            assert fast[i, j, head] == pytest.approx(naive, abs=1e-4)


def test_shuffled_labels_move_whole_label_words():
    from headperturb.data.parts import LABEL_WORDS, TEMPLATE
    from headperturb.model import function_vectors as fv

    # prefix: 1 [7 8] 2 [9] 3 | query 5 6 ; label words [7 8] and [9]
    parts = np.array([TEMPLATE, LABEL_WORDS, LABEL_WORDS, TEMPLATE, LABEL_WORDS, TEMPLATE, 0, 0])
    ids = [np.array([1, 7, 8, 2, 9, 3, 5, 6]), np.array([1, 7, 8, 2, 9, 3, 4])]
    corrupted, prefix_len = fv.shuffled_labels(ids, parts, 6, seed=0)
    assert prefix_len == 6
    assert corrupted[0].tolist() == [1, 9, 2, 7, 8, 3, 5, 6]
    assert corrupted[1].tolist() == [1, 9, 2, 7, 8, 3, 4]
    with pytest.raises(fv.FunctionVectorError, match="one label"):
        fv.shuffled_labels(ids, np.where(parts == LABEL_WORDS, TEMPLATE, parts), 6, seed=0)
