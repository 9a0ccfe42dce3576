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

import torch

from .sites import HeadSite
from .spec import SITES, noise_seed


def site_slice(model, site: HeadSite, head: int, where: str) -> slice:
    """The columns of head ``head`` at ``where`` (``o_proj_input`` or ``o_proj_output``)."""
    if where == "o_proj_input":
        return site.head_slice(head)
    if where == "o_proj_output":
        weight = model.get_submodule(site.module_name).weight
        out_features = weight.shape[1] if site.transposed else weight.shape[0]
        width = out_features // site.n_heads
        site.head_slice(head)  # range check
        return slice(head * width, (head + 1) * width)
    raise ValueError(f"site {where!r} is not allowed; allowed: {', '.join(SITES)}")


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
    model, site: HeadSite, head: int, noise: torch.Tensor, where: str = "o_proj_input"
) -> Iterator[None]:
    """While active, add ``noise`` to head ``head``'s slice at ``where``.

    ``noise`` has shape (batch or 1, length, width); it is aligned to the *last* positions of the
    hooked tensor, so a pass over only the final tokens of a prompt receives the noise of those
    positions.
    """
    cols = site_slice(model, site, head, where)
    module = model.get_submodule(site.module_name)

    def add(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        seq = x.shape[-2]
        x[..., cols] += noise[..., -seq:, :].to(device=x.device, dtype=x.dtype)
        return x

    if where == "o_proj_input":
        handle = module.register_forward_pre_hook(lambda _m, args: (add(args[0]), *args[1:]))
    else:
        handle = module.register_forward_hook(lambda _m, _args, out: add(out))
    try:
        yield
    finally:
        handle.remove()
