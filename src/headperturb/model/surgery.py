"""Temporary changes to a model's module tree, so that its own ``forward`` computes only what a
measurement needs. Every change is undone when its ``with`` block ends, also on an exception.

- :func:`skip_layers_below`: the layers below ``L`` become pass-throughs (with a hook feeding
  layer ``L`` a recorded residual stream: :func:`headperturb.model.hooks.start_at_layer`);
- :func:`narrow_lm_head`: the LM head computes only the two verbalizer rows;
- :func:`last_mlp_at`: the last layer's MLP computes only the positions whose logits are read;
- :func:`stand_in_embeddings`: the embedding table is swapped for a one-row stand-in (keeps the
  table out of an exported program);
- :func:`out_features`: the output width of a head site's projection (GPT-2's Conv1D stores its
  weight transposed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from headperturb.model.sites import HeadSite


def out_features(model, site: HeadSite) -> int:
    """The output width of ``site``'s projection, whatever its weight's storage."""
    weight = model.get_submodule(site.module_name).weight
    return int(weight.shape[1] if site.transposed else weight.shape[0])


class PassThrough(torch.nn.Module):
    """Stands in for a skipped decoder layer: returns its input unchanged."""

    def __init__(self, original: torch.nn.Module):
        super().__init__()
        if hasattr(original, "attention_type"):
            self.attention_type = original.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextlib.contextmanager
def skip_layers_below(model, site: HeadSite) -> Iterator[None]:
    """While active, the layers below ``site.layer`` return their input unchanged."""
    layers = model.get_submodule(site.layers_path)
    originals = [layers[i] for i in range(site.layer)]
    for i, layer in enumerate(originals):
        layers[i] = PassThrough(layer)
    try:
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


@contextlib.contextmanager
def skip_layers_above(model, site: HeadSite) -> Iterator[None]:
    """While active, the layers above ``site.layer`` return their input unchanged: a pass that
    only reads the input of ``site.layer`` stops paying there."""
    layers = model.get_submodule(site.layers_path)
    above = list(range(site.layer + 1, len(layers)))
    originals = [layers[i] for i in above]
    for i, layer in zip(above, originals):
        layers[i] = PassThrough(layer)
    try:
        yield
    finally:
        for i, layer in zip(above, originals):
            layers[i] = layer


@contextlib.contextmanager
def narrow_lm_head(model, token_ids: list[int]) -> Iterator[None]:
    """While active, the LM head computes only the rows of ``token_ids`` (same weights, bias)."""
    head = model.get_output_embeddings()
    small = torch.nn.Linear(head.in_features, len(token_ids), bias=head.bias is not None)
    small.to(device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        small.weight.copy_(head.weight[token_ids])
        if head.bias is not None:
            small.bias.copy_(head.bias[token_ids])
    model.set_output_embeddings(small)
    try:
        yield
    finally:
        model.set_output_embeddings(head)


class AtPositions(torch.nn.Module):
    """Stands in for a layer's MLP: runs it on position ``positions[b]`` of each row ``b`` only
    and returns zeros at every other position (an MLP works on each position alone)."""

    def __init__(self, inner: torch.nn.Module, positions: torch.Tensor):
        super().__init__()
        self.inner, self.positions = inner, positions

    def forward(self, hidden_states, *args, **kwargs):
        rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
        picked = hidden_states[rows, self.positions][:, None]
        out = self.inner(picked, *args, **kwargs)
        if not isinstance(out, torch.Tensor) or out.shape[:-1] != picked.shape[:-1]:
            return self.inner(hidden_states, *args, **kwargs)  # not a plain MLP: all positions
        full = out.new_zeros((*hidden_states.shape[:-1], out.shape[-1]))
        full[rows, self.positions] = out[:, 0]
        return full


@contextlib.contextmanager
def last_mlp_at(model, site: HeadSite, positions: torch.Tensor) -> Iterator[None]:
    """While active, the last decoder layer's MLP computes only position ``positions[b]`` of each
    row ``b`` (:class:`AtPositions`; a layer without an ``mlp`` module is left as it is). Only
    for a pass that reads nothing but those positions' logits: the last layer's output at every
    other position is wrong, and its MLP is most of that layer's cost."""
    layer = model.get_submodule(site.layers_path)[-1]
    mlp = getattr(layer, "mlp", None)
    if not isinstance(mlp, torch.nn.Module):
        yield
        return
    layer.mlp = AtPositions(mlp, positions)
    try:
        yield
    finally:
        layer.mlp = mlp


@contextlib.contextmanager
def stand_in_embeddings(model) -> Iterator[None]:
    """While active, the embedding table is a one-row table of zeros: what the model embeds no
    longer matters (the first used layer's input is replaced), and an exported program carries no
    table and no random numbers."""
    embeddings = model.get_input_embeddings()
    stand_in = torch.nn.Embedding(
        1, embeddings.embedding_dim, _weight=torch.zeros(1, embeddings.embedding_dim)
    )
    stand_in.to(device=embeddings.weight.device, dtype=embeddings.weight.dtype)
    model.set_input_embeddings(stand_in)
    try:
        yield
    finally:
        model.set_input_embeddings(embeddings)


def thread_copy(model):
    """A copy of ``model``'s module tree that shares every parameter and buffer with it: the
    changes above can then be made in one thread without touching another thread's model."""
    import copy

    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)
