"""The perturbation of one head: Gaussian noise added to the head's output while a hook is active.

``o_proj_input`` (the default) adds noise to head ``h``'s slice of the input of the attention output
projection, its own output. ``o_proj_output`` adds it to a slice of the projection's output, as the
original study did; that slice is ``out_features / n_heads`` residual-stream coordinates that every
head writes to, so it is kept to reproduce the study, not to attribute an effect to a head.

The hook removes itself when the ``with`` block ends, also on an exception.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from .sites import HeadSite, SiteError
from .spec import SITES, noise_seed


def site_slice(model, site: HeadSite, head: int, where: str) -> slice:
    """The columns of head ``head`` at ``where`` (``o_proj_input`` or ``o_proj_output``)."""
    weight = model.get_submodule(site.module_name).weight
    out_features = weight.shape[1] if site.transposed else weight.shape[0]
    return head_columns(head, where, site.layer, site.n_heads, site.head_dim, int(out_features))


def head_columns(
    head: int, where: str, layer: int, n_heads: int, head_dim: int, out_features: int
) -> slice:
    """The columns of head ``head`` at ``where``: its ``head_dim`` inputs of the projection, or
    its ``out_features / n_heads`` block of the projection's output (the original study's site)."""
    if where not in SITES:
        raise ValueError(f"site {where!r} is not allowed; allowed: {', '.join(SITES)}")
    if not 0 <= head < n_heads:
        raise SiteError(f"head {head} is out of range: layer {layer} has {n_heads}")
    width = head_dim if where == "o_proj_input" else out_features // n_heads
    return slice(head * width, (head + 1) * width)


def noise_values(*, seed: int, layer: int, head: int, scale: float, draws: int, width: int):
    """``values(index, prompt_id, length)``: the seeded noise (:func:`make_noise`) a prompt gets."""

    def values(_index, prompt_id, length):
        return make_noise(seed=seed, layer=layer, head=head, scale=scale, draws=draws,
                          prompt=prompt_id, length=length, width=width)  # fmt: skip

    return values


def make_noise(
    *,
    seed: int,
    layer: int,
    head: int,
    scale: float,
    draws: int,
    prompt: int,
    length: int,
    width: int,
) -> torch.Tensor:
    """``randn * scale`` of shape (draws, length, width), float32, one seeded generator per draw."""
    out = torch.empty(draws, length, width, dtype=torch.float32)
    for draw in range(draws):
        gen = torch.Generator().manual_seed(noise_seed(seed, layer, head, scale, draw, prompt))
        out[draw] = torch.randn(length, width, generator=gen)
    return out * float(scale)


@contextlib.contextmanager
def perturb_head(
    model,
    site: HeadSite,
    head: int,
    values: torch.Tensor,
    where: str = "o_proj_input",
    mode: str = "add",
) -> Iterator[None]:
    """While active, change head ``head``'s slice at ``where``: ``mode="add"`` adds ``values``
    (noise), ``mode="set"`` replaces the slice by ``values`` (ablations).

    ``values`` has shape (batch or 1, length, width) and is aligned to the *last* positions of the
    hooked tensor, so a pass over only the final tokens of a prompt receives the values of those
    positions. With ``set``, positions before the first of ``values`` keep their own output.
    """
    if mode not in ("add", "set"):
        raise ValueError(f"mode {mode!r} is not allowed; allowed: add, set")
    cols = site_slice(model, site, head, where)
    module = model.get_submodule(site.module_name)

    def change(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        k = min(x.shape[-2], values.shape[-2])
        v = values[..., -k:, :].to(device=x.device, dtype=x.dtype)
        if mode == "add":
            x[..., -k:, cols] += v
        else:
            x[..., -k:, cols] = v.expand(*x.shape[:-2], k, v.shape[-1])
        return x

    if where == "o_proj_input":
        handle = module.register_forward_pre_hook(lambda _m, args: (change(args[0]), *args[1:]))
    else:
        handle = module.register_forward_hook(lambda _m, _args, out: change(out))
    try:
        yield
    finally:
        handle.remove()


KINDS = ("noise", "zero", "mean", "resample")
"""What replaces or disturbs the head's output.

``noise``: ``randn * sigma`` added (the original study). ``zero``: the output set to 0. ``mean``:
the output set to its mean over the prompts at each position counted from the end. ``resample``:
the output taken from another prompt (a seeded derangement per draw), aligned from the end.
"""


def donors(seed: int, layer: int, head: int, draw: int, n: int) -> np.ndarray:
    """For each of ``n`` prompts, the prompt whose head output replaces its own: a seeded
    derangement (no prompt is its own donor when n > 1)."""
    key = noise_seed(seed, layer, head, 1.0, draw, -1)
    order = np.random.default_rng(key).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[order] = np.roll(order, -1)
    return out


def mean_from_end(activations: list[torch.Tensor]) -> torch.Tensor:
    """(max length, width): the mean over prompts at each position counted from the end."""
    longest = max(a.shape[0] for a in activations)
    width = activations[0].shape[1]
    total = torch.zeros(longest, width, dtype=torch.float64)
    count = torch.zeros(longest, 1, dtype=torch.float64)
    for a in activations:
        total[longest - a.shape[0] :] += a.double()
        count[longest - a.shape[0] :] += 1
    return (total / count).float()
