"""Where each head looks: its attention weights, as the model computes them.

The weights are the model's own: its eager attention (``attn_implementation="eager"``), which
computes them from its queries and keys with its grouped-query sharing, sliding windows, masks
and logit soft-capping, read with ``output_attentions``. One forward pass per prompt records
every layer; a head is a query head (:func:`headperturb.model.sites.n_query_heads`), and
``attentions[L][:, h]`` is layer ``L`` head ``h``'s weights, the same head whose output the
perturbations edit at the input of the output projection.

- :func:`final_rows`: per prompt, every head's attention from the final position (the row that
  forms the answer), (n_layers, n_heads, n_tokens);
- :func:`part_shares`: that row summed over the prompt's parts (:mod:`headperturb.data.parts`);
- :func:`repeated_tokens` and :func:`pattern_scores`: the head types as TransformerLens's
  tutorials define them, on sequences of random tokens repeated once: previous-token (attention
  from each position to the one before), duplicate-token (from each position of the repeat to the
  same token's first occurrence), induction (to the token after that occurrence) and the sink
  (attention to the first position).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def eager(model):
    """The model computing attention eagerly (its weights readable), then as before."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def patterns(model, ids) -> tuple[torch.Tensor, ...]:
    """Per layer (n_heads, n_tokens, n_tokens): every head's attention on one token sequence,
    in float64 (the model's eager weights)."""
    with torch.no_grad(), eager(model):
        out = model(input_ids=_tensor(model, ids), output_attentions=True)
    return tuple(a[0].double().cpu() for a in out.attentions)


def final_rows(model, prompts, prefix_len: int):
    """Yield, per prompt, (n_layers, n_heads, n_tokens): every head's attention from the prompt's
    last position. The shared prefix (its first ``prefix_len`` tokens) is encoded once and its
    keys and values reused (every position kept, the mask still applying sliding windows), so a
    prompt costs a pass over its query only."""
    from transformers import DynamicCache

    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad(), eager(model):
        cache = None
        if prefix_len:
            cache = DynamicCache()
            model(input_ids=_tensor(model, prompts[0][:prefix_len]), **{key: cache})
        for ids in prompts:
            if prefix_len and list(ids[:prefix_len]) != list(prompts[0][:prefix_len]):
                raise ValueError("the prompts do not share their first prefix_len tokens")
            out = model(
                input_ids=_tensor(model, ids[prefix_len:]),
                use_cache=cache is not None,
                **({key: cache} if cache is not None else {}),
                output_attentions=True,
                logits_to_keep=1,
            )
            yield torch.stack([a[0, :, -1, :].double().cpu() for a in out.attentions])
            if cache is not None:
                cache.crop(-(len(ids) - prefix_len))  # back to the prefix


def _tensor(model, ids) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.tensor(np.asarray(ids, dtype=np.int64), device=device)[None]


def part_shares(rows: torch.Tensor, parts: np.ndarray, n_parts: int) -> np.ndarray:
    """(n_layers, n_heads, n_parts): ``rows`` (n_layers, n_heads, n_tokens) summed over each
    part's tokens (``parts``: each token's part)."""
    index = torch.as_tensor(np.asarray(parts, dtype=np.int64))
    out = torch.zeros(*rows.shape[:2], n_parts, dtype=rows.dtype)
    out.index_add_(2, index, rows)
    return out.numpy()


def repeated_tokens(vocab: list[int], start: list[int], length: int, count: int, seed: int):
    """``count`` sequences: ``start`` (the tokens a prompt begins with, as the tokenizer adds
    them), then ``length`` tokens drawn uniformly from ``vocab`` (seeded), then the same tokens
    again."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        drawn = rng.choice(np.asarray(vocab), size=length).tolist()
        out.append([*start, *drawn, *drawn])
    return out


def pattern_scores(layers: tuple[torch.Tensor, ...], offset: int, length: int) -> np.ndarray:
    """(n_layers, n_heads, 4): the type scores
    (:data:`headperturb.analysis.anatomy.TYPE_SCORES`) of one repeated sequence's patterns
    (``offset`` start tokens, then ``length`` random tokens twice): previous-token, the mean
    attention from each position ``i >= 1`` to ``i - 1``; duplicate-token and induction, from each
    position ``i`` of the repeat to ``i - length`` and ``i - length + 1``; sink, from each position
    ``i >= 1`` to position 0."""
    a = torch.stack(layers)  # (n_layers, n_heads, n, n)
    n = a.shape[-1]
    later = torch.arange(1, n)
    repeat = torch.arange(offset + length, n)
    scores = [
        a[..., later, later - 1].mean(-1),
        a[..., repeat, repeat - length].mean(-1),
        a[..., repeat, repeat - length + 1].mean(-1),
        a[..., later, 0].mean(-1),
    ]
    return torch.stack(scores, -1).numpy()
