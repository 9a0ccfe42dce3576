"""The named activations of a model and every hook on them: this module is the only place where
headperturb registers a hook. Every edit, recording and gradient capture goes through
:func:`attach` or :func:`hooked`.

The hook points, named as TransformerLens names them (``L`` is the layer):

==============================  ==============================================================
``blocks.L.hook_resid_pre``     the residual stream entering layer ``L`` (the layer's first
                                input), (batch, seq, d_model)
``blocks.L.attn.hook_z``        every head's output before the attention output projection: the
                                projection's input, (batch, seq, n_heads * head_dim); head ``h``
                                owns columns ``h * head_dim : (h + 1) * head_dim``. The per-head
                                site (``site: o_proj_input``).
``blocks.L.hook_attn_out``      the projection's output, what attention adds to the residual
                                stream, (batch, seq, d_out). Its slices are *not* heads: the
                                projection mixes them (``site: o_proj_output``, the original
                                study's site)
``hook_resid_final``            the residual stream entering the final norm (after the last
                                layer), which the unembedding reads, (batch, seq, d_model)
``hook_embed``                  the token embeddings, (batch, seq, d_model)
==============================  ==============================================================

A :class:`Hook` is a point, a layer's :class:`~headperturb.model.sites.HeadSite` and a function
of the activation that returns a replacement or None (keep it). A function may raise
:class:`Stop` to end a forward pass once it has what it needs.

The edit of one head (:class:`Edit`): its columns at ``hook_z`` (``o_proj_input``, its own output)
or at ``hook_attn_out`` (``o_proj_output``) become ``fn(z, v)``, the kind's function of its output
and the values it reads (:meth:`headperturb.core.kinds.Perturbation.apply`), at every position or
the last ones (:func:`edit_slice`); a pass applies it with :func:`edited`. Hooks are removed when
their ``with`` block ends, also on an exception.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from headperturb.core.kinds import Noise
from headperturb.core.spec import SITES, check_position, demonstration_index
from headperturb.data.parts import Prefix
from headperturb.model.sites import HeadSite, SiteError, final_norm_name
from headperturb.model.surgery import out_features, skip_layers_below

POINTS = ("hook_embed", "hook_resid_pre", "hook_z", "hook_attn_out", "hook_resid_final")
"""The hook points (see the module docstring)."""

AT_SITE = {"o_proj_input": "hook_z", "o_proj_output": "hook_attn_out"}
"""The hook point of each per-head site of the config (``perturbation.sites``)."""


def point_name(point: str, layer: int | None = None) -> str:
    """The TransformerLens name of a point: ``blocks.3.attn.hook_z``, ``hook_embed``."""
    if point not in POINTS:
        raise ValueError(f"hook point {point!r} is not allowed; allowed: {', '.join(POINTS)}")
    if point in ("hook_embed", "hook_resid_final"):
        return point
    return f"blocks.{layer}.attn.hook_z" if point == "hook_z" else f"blocks.{layer}.{point}"


class Stop(Exception):
    """Raised by a hook's function to end a forward pass once it has what it needs."""


@dataclass(frozen=True)
class Hook:
    """``fn(activation)`` at ``point`` of ``site``'s layer (``site`` None for ``hook_embed`` and
    ``hook_resid_final``): returns the activation to use instead, or None to keep it."""

    point: str
    site: HeadSite | None
    fn: Callable[[torch.Tensor], torch.Tensor | None]


def first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The first input of a module call, whether passed by position or by keyword (decoder layers
    take the hidden states either way)."""
    return args[0] if args else next(iter(kwargs.values()))


def with_first_input(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with the first input replaced by ``value`` (cast to its dtype)."""
    if args:
        return (value.to(args[0].dtype), *args[1:]), kwargs
    key = next(iter(kwargs))
    return args, {**kwargs, key: value.to(kwargs[key].dtype)}


def _module(model, point: str, site: HeadSite | None):
    """The module a point hooks: its output (``hook_embed``, ``hook_attn_out``) or its first
    input (``hook_resid_pre``, ``hook_z``, ``hook_resid_final``)."""
    if point == "hook_embed":
        return model.get_input_embeddings()
    if point == "hook_resid_pre":
        return model.get_submodule(site.layers_path)[site.layer]
    if point == "hook_resid_final":
        name = final_norm_name(model)
        if name is None:
            raise SiteError(f"{type(model).__name__} has no final norm headperturb knows")
        return model.get_submodule(name)
    if point in ("hook_z", "hook_attn_out"):
        return model.get_submodule(site.module_name)
    point_name(point)  # raises: not a point


def _on_output(fn, _module, _args, output):
    return fn(output)


def _on_input(fn, _module, args, kwargs):
    new = fn(first_input(args, kwargs))
    return None if new is None else with_first_input(args, kwargs, new)


def attach(model, hooks) -> list:
    """Register ``hooks`` on ``model``; returns the handles (:func:`detach` removes them)."""
    handles = []
    for hook in hooks:
        module = _module(model, hook.point, hook.site)
        if hook.point in ("hook_embed", "hook_attn_out"):
            handles.append(module.register_forward_hook(functools.partial(_on_output, hook.fn)))
        else:
            on_input = functools.partial(_on_input, hook.fn)
            handles.append(module.register_forward_pre_hook(on_input, with_kwargs=True))
    return handles


def detach(handles) -> None:
    for handle in handles:
        handle.remove()


@contextlib.contextmanager
def hooked(model, *hooks: Hook) -> Iterator[None]:
    """While active, ``hooks`` are on ``model``; all removed afterwards, also on an exception."""
    handles = attach(model, hooks)
    try:
        yield
    finally:
        detach(handles)


@contextlib.contextmanager
def start_at_layer(model, site: HeadSite, hidden: torch.Tensor) -> Iterator[None]:
    """While active, the model's forward skips the layers below ``site.layer``
    (:func:`headperturb.model.surgery.skip_layers_below`) and feeds ``hidden`` (batch, seq,
    d_model) into that layer at ``hook_resid_pre``."""
    with hooked(model, Hook("hook_resid_pre", site, lambda _x: hidden)):
        with skip_layers_below(model, site):
            yield


# -- the edit of one head's output -----------------------------------------------------------


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


KEEP = float("nan")
"""The one way to say "keep this position's output": an edit's values hold ``KEEP`` at the
positions it leaves as they are (outside a segment, a padded row's pads)."""


def kept(values: torch.Tensor) -> torch.Tensor:
    """Where ``values`` say :data:`KEEP`."""
    return torch.isnan(values)


def edit_slice(x: torch.Tensor, cols: slice, values: torch.Tensor, fn) -> torch.Tensor:
    """``x`` (..., seq, width) with the columns ``cols`` of its last ``k`` positions (``k`` = the
    shorter of the two lengths) set to ``fn(z, v)``: ``z`` their output, ``v`` ``values``
    (batch or 1, k, len(cols)) aligned to the last positions; where ``v`` is :data:`KEEP`, ``z``
    stays."""
    k = min(x.shape[-2], values.shape[-2])
    v = values[..., -k:, :].to(device=x.device, dtype=x.dtype)  # (batch or 1, k, width)
    v = v.expand(*x.shape[:-2], k, v.shape[-1])  # (..., k, width)
    z = x[..., -k:, cols]  # (..., k, width)
    new = fn(z, v)
    keep = kept(v)
    if keep.any():  # positions outside the edited segment keep their own output
        new = torch.where(keep, z, new)
    out = x.clone()
    out[..., -k:, cols] = new
    return out


def segment(position: str, length: int, prefix: Prefix) -> np.ndarray:
    """(length,) which positions of a prompt of ``length`` tokens ``position`` edits: every one
    (``all``), the final one (``last``), the demonstrations (the first ``prefix.length``), the
    review (the rest but the final one), the demonstrations' label words (``label_words``) or
    the ``i``-th demonstration (``demonstration_<i>``), as ``prefix`` places them."""
    check_position(position)
    mask = np.zeros(length, dtype=bool)
    i = demonstration_index(position)
    if i is not None:
        if i > len(prefix.demonstrations):
            raise ValueError(
                f"position {position} asks for demonstration {i}; the prompts have "
                f"{len(prefix.demonstrations)}"
            )
        mask[slice(*prefix.demonstrations[i - 1])] = True
        return mask
    if position == "label_words" and prefix.length and not prefix.label_words:
        raise ValueError(
            "position label_words needs the label words placed in the prefix "
            "(headperturb.data.parts.prefix_layout); this Prefix holds only its length"
        )
    spans = {
        "all": slice(0, length),
        "last": slice(length - 1, length),
        "demonstrations": slice(0, prefix.length),
        "review": slice(prefix.length, length - 1),
        "label_words": list(prefix.label_words),
    }
    mask[spans[position]] = True
    return mask


def only_segment(values: torch.Tensor, length: int, mask: np.ndarray) -> torch.Tensor:
    """``values`` (aligned to the last positions of a prompt of ``length`` tokens) with
    :data:`KEEP` where ``mask`` (``(length,)``, :func:`segment`) is False."""
    out = values.clone()
    outside = torch.from_numpy(~mask[length - values.shape[-2] :])
    out[..., outside, :] = KEEP
    return out


@dataclass(frozen=True)
class Edit:
    """The edit of one head: head ``head`` of ``site``, at ``where`` (o_proj input or output),
    over ``position`` (``all`` positions, the ``last`` one, the ``demonstrations``, the
    ``review``, the ``label_words`` or a ``demonstration_<i>``: :func:`segment`, as ``prefix``
    places them), its columns set to ``fn(z, v)`` (the kind's
    :meth:`~headperturb.core.kinds.Perturbation.apply`) in each of ``draws`` draws.

    ``values(index, prompt_id, length)`` gives ``v``, a (draws or 1, length, width) tensor aligned
    to the last ``length`` positions (see :mod:`headperturb.core.kinds`)."""

    site: HeadSite
    head: int
    where: str
    values: Callable
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    draws: int
    position: str = "all"
    prefix: Prefix = Prefix()  # where the demonstrations lie, for the segments

    def __post_init__(self):
        check_position(self.position)  # raises for a position that is none

    def for_prompt(self, index: int, prompt_id: int, length: int) -> torch.Tensor:
        """The values for one prompt of ``length`` tokens: every position, the final one, or
        every position with :data:`KEEP` outside the segment (:func:`only_segment`)."""
        if self.position == "last":
            return self.values(index, prompt_id, 1)
        values = self.values(index, prompt_id, length)
        if self.position == "all":
            return values
        return only_segment(values, length, segment(self.position, length, self.prefix))

    @property
    def members(self) -> tuple[Edit, ...]:
        """The single-head edits this edit is made of: itself (:class:`EditSet` has several)."""
        return (self,)

    def values_for(self, index: int, prompt_id: int, length: int) -> tuple[torch.Tensor, ...]:
        """One prompt's values, one tensor per member (:meth:`for_prompt`)."""
        return (self.for_prompt(index, prompt_id, length),)

    def hook(self, model, values: torch.Tensor) -> Hook:
        """The hook that applies ``values`` (one prompt's, from :meth:`for_prompt`)."""
        cols = site_slice(model, self.site, self.head, self.where)
        edit = functools.partial(edit_slice, cols=cols, values=values, fn=self.fn)
        return Hook(AT_SITE[self.where], self.site, edit)


@dataclass(frozen=True)
class EditSet:
    """Several heads edited together (a joint ablation or patching of a set of heads): every
    member's :class:`Edit` at once, at the same positions and draws. A pass starts at the lowest
    member's layer (``site``)."""

    edits: tuple[Edit, ...]

    def __post_init__(self):
        if not self.edits:
            raise ValueError("a set of heads needs at least one head")
        if len({(e.draws, e.position) for e in self.edits}) != 1:
            raise ValueError("the heads of a set are edited at the same positions and draws")

    @property
    def members(self) -> tuple[Edit, ...]:
        return self.edits

    @property
    def site(self) -> HeadSite:
        """The lowest member's site: everything below it is what the baseline computed."""
        return min((e.site for e in self.edits), key=lambda s: s.layer)

    @property
    def draws(self) -> int:
        return self.edits[0].draws

    @property
    def position(self) -> str:
        return self.edits[0].position

    def values_for(self, index: int, prompt_id: int, length: int) -> tuple[torch.Tensor, ...]:
        return tuple(e.for_prompt(index, prompt_id, length) for e in self.edits)


@contextlib.contextmanager
def edited(model, edit: Edit | EditSet, values: tuple | None) -> Iterator[None]:
    """While active, ``edit``'s members change ``model`` with ``values`` (one tensor per member,
    from ``values_for``); None: nothing to edit (the model runs as it is)."""
    members = zip(edit.members, values) if values is not None else ()
    with hooked(model, *(member.hook(model, v) for member, v in members)):
        yield


@contextlib.contextmanager
def perturb_head(
    model, site: HeadSite, head: int, values: torch.Tensor, where: str = "o_proj_input", fn=None
) -> Iterator[None]:
    """While active, head ``head``'s slice at ``where`` becomes ``fn(z, values)`` (default: the
    values added, as noise is) at every position :func:`edit_slice` aligns ``values`` (shape
    (batch or 1, length, width)) to: the *last* positions of the hooked tensor."""
    fn = Noise.apply if fn is None else fn
    edit = Edit(site, head, where, lambda *_: values, fn, values.shape[0])
    with edited(model, edit, (values,)):
        yield
