"""What a head writes: its final-position output read at the unembedding (the logit lens of one
head, every later layer left out, every norm's scale frozen at its unperturbed value).

Head ``h`` of layer ``L`` adds ``o = W_O[:, h] z_h`` to the residual stream (its slice of the
output projection; in Gemma 2/3 and OLMo 2 through the norm after attention, its scale frozen).
Through the final norm with its scale frozen (:class:`headperturb.model.direct.FrozenNorm`) and
the unembedding, ``o`` adds ``W_U (w * P o / s)`` to the logits: a vector over the vocabulary,
linear in ``z_h``, so its mean over prompts is the mean write's. Two are read:

- ``mean``: the head's write averaged over every prompt (what it always writes);
- ``contrast``: its write on positive reviews minus on negative reviews (what it writes about
  the review's label: on average what patching it from an opposite review carries).

For each, the tokens it most promotes and suppresses, and the two label words' place among
them: the contrast's ``label_gap`` (positive minus negative label word, in logits; the head's
direct effect on the margin, averaged over labels) and each label word's rank.
Everything comes from the baseline's final state and the model's weights: no forward pass.
"""

from __future__ import annotations

import numpy as np
import torch

from headperturb.model.direct import FrozenNorm, final_norm, projection_weight
from headperturb.model.sites import HeadSite, post_attention_norm

WRITES = ("mean", "contrast")


def unembedding(model) -> torch.Tensor:
    """(vocab, d): the logits' matrix applied to the final norm's output (through OPT's output
    projection where there is one, over Granite's ``logits_scaling``)."""
    w = model.get_output_embeddings().weight.detach().double()
    project_out = getattr(
        getattr(getattr(model, "model", None), "decoder", None), "project_out", None
    )
    if project_out is not None:
        w = w @ project_out.weight.detach().double()
    return w / float(getattr(model.config, "logits_scaling", 1.0) or 1.0)


def head_outputs(model, site: HeadSite, state: dict) -> torch.Tensor:
    """(n, n_heads, d): each head's final-position write after the final norm (its scale frozen)
    on each prompt, from the baseline's final state."""
    n = state["resid_final"].shape[0]
    z = state[f"z.{site.layer}"].double().reshape(n, site.n_heads, site.head_dim)
    weight = projection_weight(model, site).reshape(-1, site.n_heads, site.head_dim)
    o = torch.einsum("nhk,dhk->nhd", z, weight)
    post = post_attention_norm(model, site)
    if post is not None:
        frozen, x = FrozenNorm.of(post), state[f"out.{site.layer}"].double()
        o = torch.stack([frozen.apply(o[:, h], x) for h in range(site.n_heads)], 1)
    norm, resid = final_norm(model), state["resid_final"].double()
    return torch.stack([norm.apply(o[:, h], resid) for h in range(site.n_heads)], 1)


def read_writes(model, sites, state: dict, labels: np.ndarray, token_ids, top: int = 10):
    """One row per head and write (:data:`WRITES`): its ``top`` most promoted and suppressed
    token ids with their logits, the label words' logits, ranks (1: the most promoted) and
    ``label_gap`` (positive minus negative label word)."""
    w_u = unembedding(model)
    negative, positive = (int(t) for t in token_ids)
    labels = np.asarray(labels)
    rows = []
    for site in sites:
        y = head_outputs(model, site, state)  # (n, n_heads, d)
        means = {
            "mean": y.mean(0),
            "contrast": y[labels == 1].mean(0) - y[labels == 0].mean(0),
        }
        for write, vectors in means.items():
            logits = vectors @ w_u.T  # (n_heads, vocab)
            for head in range(site.n_heads):
                row = _top_tokens(logits[head], top, negative, positive)
                rows.append({"layer": site.layer, "head": head, "write": write, **row})
    return rows


def _top_tokens(logits: torch.Tensor, top: int, negative: int, positive: int) -> dict:
    order = torch.argsort(logits, descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(order) + 1)
    return {
        "promoted": order[:top].tolist(),
        "promoted_logits": logits[order[:top]].tolist(),
        "suppressed": order.flip(0)[:top].tolist(),
        "suppressed_logits": logits[order.flip(0)[:top]].tolist(),
        "positive_logit": float(logits[positive]),
        "negative_logit": float(logits[negative]),
        "label_gap": float(logits[positive] - logits[negative]),
        "positive_rank": int(rank[positive]),
        "negative_rank": int(rank[negative]),
        "spread": float(logits.std()),
    }
