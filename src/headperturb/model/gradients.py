"""The screen's passes: for every prompt, the margin's gradient at every head's output (the o_proj
input, ``hook_z``) of every layer, from one forward and one backward pass, and the sums the
first-order estimates are made of (:mod:`headperturb.analysis.screen` makes the estimates and
chooses heads from them, without torch).
"""

from __future__ import annotations

import numpy as np
import torch

from headperturb.data.parts import Prefix
from headperturb.joblog import Progress
from headperturb.model import cache, hooks
from headperturb.model.engine import Engine
from headperturb.model.sites import HeadSite
from headperturb.model.surgery import narrow_lm_head

BASE_POSITIONS = ("all", "last", "demonstrations", "review")
"""The positions :func:`gradient_sums` sums over unless told."""


def head_means(
    engine: Engine,
    prompts: list,
    sites: list[HeadSite],
    batch_size: int = 4,
    where: str = "o_proj_input",
):
    """Each layer's o_proj input (or output: ``where``) averaged over the prompts at each position
    counted from the end:
    ``{layer: (longest prompt, width)}``, right-aligned (the last row is the final position), as
    :func:`headperturb.core.kinds.mean_from_end` makes the values of the mean ablation."""
    current: dict = {"lengths": None}
    prefix: dict[int, torch.Tensor] = {}
    sums: dict[int, torch.Tensor] = {}
    counts = torch.zeros(max(len(p) for p in prompts), 1, dtype=torch.float64)

    def record(layer):
        def hook(z):
            x = z.detach().double().cpu()
            if current["lengths"] is None:
                prefix[layer] = x[0].flip(0)
                return
            total = sums.setdefault(
                layer, torch.zeros(len(counts), x.shape[-1], dtype=torch.float64)
            )
            for row, q in enumerate(current["lengths"].tolist()):
                total[:q] += x[row, :q].flip(0)
                if layer in prefix:
                    total[q : q + len(prefix[layer])] += prefix[layer]

        return hook

    recorders = [hooks.Hook(hooks.AT_SITE[where], s, record(s.layer)) for s in sites]
    with hooks.hooked(engine.model, *recorders), torch.inference_mode():
        cache = engine.prefix_cache(prompts)
        for _i, lengths, _l, _c in engine.suffix_batches(cache, prompts, batch_size, current):
            for q in lengths.tolist():
                counts[: q + engine.prefix_len] += 1
    return {layer: (total / counts.clamp(min=1)).flip(0).float() for layer, total in sums.items()}


def gradient_sums(
    engine: Engine,
    prompts: list,
    sites: list[HeadSite],
    means: dict,
    progress: Progress | None = None,
    partners: list[int] | None = None,
    positions=BASE_POSITIONS,
    prefix: Prefix | None = None,
) -> dict[str, np.ndarray]:
    """For every prompt, layer and head: ``z_dot_g``, ``mean_dot_g`` and ``g_norm`` over each of
    ``positions`` (``.all``, ``.last``, ``.demonstrations``, ``.review``, ``.label_words``,
    ``.demonstration_<i>``: :func:`headperturb.model.hooks.segment`, as ``prefix`` places them;
    None: ``Prefix(engine.prefix_len)``), from one forward and one backward pass per prompt
    through the model's own modules. Arrays (n, layers, heads).

    The shared prefix runs forward once; each prompt's query then runs on its cache and one
    backward pass gives that prompt's gradient at every position, the prefix's included.
    ``partners`` (for each prompt the index of its opposite-sentiment partner, -1 for none) adds
    ``partner_dot_g``: the partner's head outputs (one more forward pass, no backward) times the
    prompt's gradient, NaN where a prompt has no partner."""
    n_heads = sites[0].n_heads
    sums = ("z_dot_g", "mean_dot_g", "g_norm") + (("partner_dot_g",) if partners else ())
    out = {
        f"{q}.{p}": np.zeros((len(prompts), len(sites), n_heads)) for q in sums for p in positions
    }
    prefix = Prefix(engine.prefix_len) if prefix is None else prefix
    with _Gradients(engine, sites) as grads:
        for i, ids in enumerate(prompts):
            zs, gs = grads.of(ids)
            partner = partners[i] if partners else -1
            zp = grads.inputs(prompts[partner]) if partner >= 0 else None
            n = len(ids)
            masks = [hooks.segment(p, n, prefix) for p in positions]
            masks = torch.from_numpy(np.stack(masks)).double()  # (positions, length)
            for layer, (z, g) in enumerate(zip(zs, gs)):
                mu = means[sites[layer].layer][-n:]
                p = zp[layer] if zp is not None else None
                at = _segment_sums(z, g, mu, p, masks, n_heads)
                for q, value in at.items():
                    for k, part in enumerate(positions):
                        out[f"{q}.{part}"][i, layer] = value[k]
                if partners and p is None:
                    for part in positions:
                        out[f"partner_dot_g.{part}"][i, layer] = np.nan
            if progress:
                progress.update()
    return out


def _segment_sums(z, g, mu, partner, masks, n_heads: int) -> dict[str, np.ndarray]:
    """One layer of one prompt: ``z_dot_g``, ``mean_dot_g``, ``g_norm`` and, with ``partner``,
    ``partner_dot_g``, each (positions, heads): the per-position products summed over each
    head's columns, then over each position's ``masks`` row (positions, length) by one product.
    ``z``, ``g``, ``mu`` and ``partner`` are (length, heads * head_dim)."""
    n = g.shape[0]
    g = g.double().reshape(n, n_heads, -1)
    products = {
        "z_dot_g": (z.double().reshape(n, n_heads, -1) * g).sum(-1),
        "mean_dot_g": (mu.double().reshape(n, n_heads, -1) * g).sum(-1),
        "g_norm": g.pow(2).sum(-1),
    }
    if partner is not None:
        products["partner_dot_g"] = (partner.double().reshape(n, n_heads, -1) * g).sum(-1)
    out = {q: (masks @ value).numpy() for q, value in products.items()}  # (positions, heads)
    out["g_norm"] = np.sqrt(out["g_norm"])
    return out


class _Gradients:
    """While active, :meth:`of` gives a prompt's o_proj inputs at every layer and the gradient of
    its margin with respect to them. The shared prefix's forward pass (and its graph) is made
    once and reused; the weights keep no gradient."""

    def __init__(self, engine: Engine, sites: list[HeadSite]):
        self.engine, self.sites = engine, sites
        self.seen: list = [None] * len(sites)

    def __enter__(self):
        import contextlib

        model = self.engine.model
        self.stack = contextlib.ExitStack()
        self.stack.enter_context(torch.enable_grad())
        self.stack.enter_context(narrow_lm_head(model, self.engine.token_ids))
        self.stack.enter_context(cache.frozen_parameters(model))  # gradients reach activations only
        recorders = [hooks.Hook("hook_embed", None, lambda out: out.requires_grad_(True))]
        for k, site in enumerate(self.sites):
            recorders.append(hooks.Hook("hook_z", site, lambda z, k=k: self.seen.__setitem__(k, z)))
        self.stack.enter_context(hooks.hooked(model, *recorders))
        self.prefix, self.cache = [], None
        return self

    def __exit__(self, *exc):
        self.stack.close()

    def _prefix(self, ids) -> None:
        """The shared prefix, once: its o_proj inputs and its cache, with their graph."""
        self.cache = self.engine.prefix_cache([ids])
        self.prefix = list(self.seen)

    def _run(self, ids):
        """The margin of one prompt, its query run on a copy of the prefix's cache."""
        import copy

        n = self.engine.prefix_len
        if n and not self.prefix:
            self._prefix(ids)
        kwargs = {}
        if n:
            cache = copy.copy(self.cache)
            cache.layers = [copy.copy(layer) for layer in self.cache.layers]
            kwargs = {self.engine.cache_kw: cache}
        logits = self.engine.model(
            input_ids=self.engine.ids(ids[n:]), use_cache=bool(n), logits_to_keep=1, **kwargs
        ).logits
        return logits[0, -1, 1] - logits[0, -1, 0]

    def inputs(self, ids) -> list:
        """One prompt's o_proj inputs, (length, width) per layer, without a gradient."""
        with torch.no_grad():
            self._run(ids)
        own = [x[0] for x in self.seen]
        if self.prefix:
            own = [torch.cat([p[0], q]) for p, q in zip(self.prefix, own)]
        return [z.detach().float().cpu() for z in own]

    def of(self, ids) -> tuple[list, list]:
        """(o_proj inputs, gradients) of one prompt, (length, width) per layer."""
        margin = self._run(ids)
        own = list(self.seen)
        wrt = [*self.prefix, *own]  # the last layer's prefix reaches no later position: no gradient
        n = self.engine.prefix_len
        grads = torch.autograd.grad(margin, wrt, retain_graph=bool(n), allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(wrt, grads)]
        g_prefix, g_own = grads[: len(self.prefix)], grads[len(self.prefix) :]
        if self.prefix:
            zs = [torch.cat([p[0], q[0]]) for p, q in zip(self.prefix, own)]
            gs = [torch.cat([p[0], q[0]]) for p, q in zip(g_prefix, g_own)]
        else:
            zs, gs = [q[0] for q in own], [g[0] for g in g_own]
        return [z.detach().float().cpu() for z in zs], [g.float().cpu() for g in gs]
