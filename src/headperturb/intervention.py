"""The edit of one head's output while a hook is active: its columns at a site, changed by values
that are added (noise) or set (ablations).

``o_proj_input`` (the default) edits head ``h``'s slice of the input of the attention output
projection, its own output. ``o_proj_output`` edits a slice of the projection's output, as the
original study did; that slice is ``out_features / n_heads`` residual-stream coordinates that every
head writes to, so it is kept to reproduce the study, not to attribute an effect to a head.

The hook removes itself when the ``with`` block ends, also on an exception.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .sites import HeadSite, SiteError
from .spec import SITES
from .surgery import out_features

MODES = ("add", "set")


def site_slice(model, site: HeadSite, head: int, where: str) -> slice:
    """The columns of head ``head`` at ``where`` (``o_proj_input`` or ``o_proj_output``)."""
    return head_columns(
        head, where, site.layer, site.n_heads, site.head_dim, out_features(model, site)
    )


def head_columns(
    head: int, where: str, layer: int, n_heads: int, head_dim: int, d_out: int
) -> slice:
    """The columns of head ``head`` at ``where``: its ``head_dim`` inputs of the projection, or
    its ``d_out / n_heads`` block of the projection's output (the original study's site)."""
    if where not in SITES:
        raise ValueError(f"site {where!r} is not allowed; allowed: {', '.join(SITES)}")
    if not 0 <= head < n_heads:
        raise SiteError(f"head {head} is out of range: layer {layer} has {n_heads}")
    width = head_dim if where == "o_proj_input" else d_out // n_heads
    return slice(head * width, (head + 1) * width)


def edit(x: torch.Tensor, cols: slice, values: torch.Tensor, mode: str) -> torch.Tensor:
    """``x`` (..., seq, width) with ``values`` (batch or 1, k, len(cols)) added to, or set on, the
    columns ``cols`` of its last ``k`` positions (``k`` = the shorter of the two lengths)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not allowed; allowed: {', '.join(MODES)}")
    x = x.clone()
    k = min(x.shape[-2], values.shape[-2])
    v = values[..., -k:, :].to(device=x.device, dtype=x.dtype)
    if mode == "add":
        x[..., -k:, cols] += v
    else:
        x[..., -k:, cols] = v.expand(*x.shape[:-2], k, v.shape[-1])
    return x


@contextlib.contextmanager
def perturb_head(
    model,
    site: HeadSite,
    head: int,
    values: torch.Tensor,
    where: str = "o_proj_input",
    mode: str = "add",
) -> Iterator[None]:
    """While active, change head ``head``'s slice at ``where`` with :func:`edit`.

    ``values`` has shape (batch or 1, length, width) and is aligned to the *last* positions of the
    hooked tensor, so a pass over only the final tokens of a prompt receives the values of those
    positions, and values of length 1 perturb the final position alone. With ``set``, positions
    before the first of ``values`` keep their own output.
    """
    cols = site_slice(model, site, head, where)
    module = model.get_submodule(site.module_name)
    if where == "o_proj_input":
        handle = module.register_forward_pre_hook(
            lambda _m, args: (edit(args[0], cols, values, mode), *args[1:])
        )
    else:
        handle = module.register_forward_hook(lambda _m, _args, out: edit(out, cols, values, mode))
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True)
class Edit:
    """What a perturbed pass applies: head ``head`` of ``site``, at ``where`` (o_proj input or
    output), over ``position`` (``all`` positions or the ``last`` one), its columns changed by
    ``values`` (added or set, ``mode``) in each of ``draws`` draws.

    ``values(index, prompt_id, length)`` gives a (draws or 1, length, width) tensor aligned to the
    last ``length`` positions (see :mod:`headperturb.perturbations`)."""

    site: HeadSite
    head: int
    where: str
    values: Callable
    mode: str
    draws: int
    position: str = "all"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not allowed; allowed: {', '.join(MODES)}")

    def for_prompt(self, index: int, prompt_id: int, length: int) -> torch.Tensor:
        """The values for one prompt of ``length`` tokens: every position, or the final one."""
        return self.values(index, prompt_id, length if self.position == "all" else 1)

    @contextlib.contextmanager
    def applied(self, model, values: torch.Tensor) -> Iterator[None]:
        """While active, ``values`` (one prompt's, from :meth:`for_prompt`) edit the model."""
        with perturb_head(model, self.site, self.head, values, self.where, self.mode):
            yield
