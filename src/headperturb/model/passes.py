"""The perturbed forward passes: (n, draws, 2) verbalizer logits with one head edited
(an :class:`headperturb.model.hooks.Edit`) or several
(an :class:`~headperturb.model.hooks.EditSet`).
Which one a job runs is :func:`headperturb.core.plans.plan`'s choice, and
:func:`headperturb.model.run.run` calls it.

- :func:`naive`: the reference. A full forward pass over the whole prompt with the hook, all draws
  of a prompt in one batch.
- :func:`shared_prefix`: every layer before ``L`` computes exactly what the baseline computed, so
  the pass starts at ``L`` from the residual stream recorded there
  (:meth:`headperturb.model.engine.Engine.capture_layer_inputs`) and runs only layers ``>= L``;
  the demonstrations once per group of prompts that get the same values there, then each
  prompt's own tokens on top of them.
- :func:`partner_patched`: a set of heads patched at every position: each prompt beside its
  partner in one batch from the lowest member's layer, the members' outputs copied across.
- :func:`last_layer`: at the last layer only the final position reaches the logits, and an edit
  after the attention leaves that layer's keys and values unchanged: one position per prompt
  through :class:`headperturb.model.tail.LastLayer`, every prompt and draw in one batch.
- :func:`final_position`: an edit of the final position alone (``positions: last``) at any layer
  ``L`` leaves every earlier position's keys and values unchanged at every layer. The pass runs
  the final token alone through layers ``>= L``, from the residual stream recorded there
  (:meth:`~headperturb.model.engine.Engine.baseline`), attending to the recorded keys and values
  (:meth:`~headperturb.model.engine.Engine.capture_cache`): one token per prompt and draw, batched.

Each runs the model's own modules through its own ``forward`` (:mod:`headperturb.model.surgery`),
so masks, rotary embeddings and family quirks stay the model's; the equivalence tests check every
fast pass against :func:`naive` to 1e-4. :func:`clean_outputs` gives a head's clean output at
every position (at the final position: :func:`headperturb.model.tail.final_outputs`, from the
baseline's recording), which the mean and resample ablations are built from.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from headperturb import joblog
from headperturb.model import hooks, tail
from headperturb.model.engine import Engine, fill_below, on_device, padded_inputs, two_logits
from headperturb.model.final_token import final_position
from headperturb.model.hooks import Edit, site_slice, start_at_layer
from headperturb.model.sites import HeadSite
from headperturb.model.surgery import last_mlp_at, narrow_lm_head

__all__ = [  # the passes; final_position lives in headperturb.model.final_token
    "naive",
    "shared_prefix",
    "partner_patched",
    "last_layer",
    "final_position",
    "full",
    "clean_outputs",
    "layer_input",
]


@torch.inference_mode()
def full(engine: Engine, ids, batch: int = 1) -> np.ndarray:
    """(batch, 2) verbalizer logits of a plain full forward over the whole prompt (no narrowed
    LM head: the reference)."""
    inputs = engine.ids(ids).expand(batch, -1)
    logits = engine.model(input_ids=inputs, use_cache=False, logits_to_keep=1).logits[:, -1, :]
    return logits[:, engine.token_ids].float().cpu().numpy()


@torch.inference_mode()
def naive(
    engine: Engine,
    prompts: list,
    prompt_ids: list[int],
    edit: Edit,
) -> np.ndarray:
    """(n, draws, 2) logits with ``edit`` applied: full forward passes (the reference)."""
    out = np.empty((len(prompts), edit.draws, 2), dtype=np.float64)
    for i, (ids, pid) in enumerate(zip(prompts, prompt_ids)):
        values = on_device(edit.values_for(i, pid, len(ids)), engine.device)
        with hooks.edited(engine.model, edit, values):
            out[i] = full(engine, ids, batch=edit.draws)
        joblog.advance()
    return out


def layer_input(captured: dict[str, torch.Tensor], i: int) -> torch.Tensor:
    """Prompt ``i``'s recorded layer input: the shared prefix, then its own query positions."""
    offsets = captured["offsets"]
    return torch.cat([captured["prefix"], captured["suffix"][offsets[i] : offsets[i + 1]]])


def _own_values(edit, row: int, pid: int, length: int, start: int, stop: int, device):
    """The edit's values for one prompt's positions ``[start, stop)`` (one tensor per member),
    or None where they are all :data:`~headperturb.model.hooks.KEEP` (nothing to edit there)."""
    values = []
    for v in edit.values_for(row, pid, length):
        first = length - v.shape[-2]
        part = v[..., max(start - first, 0) : max(stop - first, 0), :]
        if part.shape[-2] < stop - start:  # values shorter than the prompt: keep the rest
            pad = torch.full(
                (*part.shape[:-2], stop - start - part.shape[-2], part.shape[-1]), hooks.KEEP
            )
            part = torch.cat([pad, part], dim=-2)
        values.append(part)
    if all(hooks.kept(v).all() for v in values):
        return None
    return tuple(v.to(device) for v in values)


def _stacked(per_row: list, draws: int, width: int):
    """The rows' own values (one tuple per row from :func:`_own_values`, or None) as one
    (draws * rows, width, columns) tensor per member, draw-major (row ``r`` of draw ``d`` at
    ``d * rows + r``), right-padded with :data:`~headperturb.model.hooks.KEEP` to ``width``
    positions; None where
    no row edits anything."""
    present = [v for v in per_row if v is not None]
    if not present:
        return None
    out = []
    for m, ref in enumerate(present[0]):
        block = ref.new_full((draws, len(per_row), width, ref.shape[-1]), hooks.KEEP)
        for r, values in enumerate(per_row):
            if values is not None:
                block[:, r, : values[m].shape[-2]] = values[m]
        out.append(block.reshape(draws * len(per_row), width, ref.shape[-1]))
    return tuple(out)


@torch.inference_mode()
def shared_prefix(
    engine: Engine,
    captured: dict[str, torch.Tensor],
    prompts: list,
    prompt_ids: list[int],
    edit: Edit,
    keys: list | None = None,
    runs: list[int] | None = None,
    batch_size: int = 4,
) -> np.ndarray:
    """(n, draws, 2) logits with ``edit`` applied at any layer ``L``, running only layers >= L
    from the recorded residual stream entering ``L``, with the
    demonstrations computed once per group of prompts whose values there are equal.

    ``keys[i]`` groups the rows (:meth:`headperturb.core.kinds.Perturbation.prefix_key`): rows
    with equal keys share one pass over the demonstrations with the edit (``"clean"``: without
    it; None: a group of its own), whose keys and values every row's own tokens then attend to.
    Every prompt starts with the same demonstrations and a causal model's outputs there cannot see
    what follows, so this is the full pass, computed once. The rows of a group then run
    ``batch_size`` at a time (shortest first), their own tokens right-padded to the longest as
    the baseline's are (:meth:`headperturb.model.engine.Engine.suffix_batches`): with causal
    attention no real position sees a pad, and the edit's values are placed per row."""
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} is not allowed: it must be >= 1")
    runs = list(range(len(prompts))) if runs is None else list(runs)
    keys = [None] * len(prompts) if keys is None else list(keys)
    groups: dict = {}
    for row, key in enumerate(keys):
        groups.setdefault(("own", row) if key is None else key, []).append(row)
    out = np.empty((len(prompts), edit.draws, 2), dtype=np.float64)
    offsets = captured["offsets"]
    for row, ids in enumerate(prompts):
        if len(ids) - engine.prefix_len != int(offsets[runs[row] + 1] - offsets[runs[row]]):
            raise ValueError(
                f"the layer input recorded for prompt {prompt_ids[row]} does not match its length"
            )
    for key, rows in groups.items():
        first = rows[0]
        values = None  # the demonstrations of the "clean" group are the baseline's
        if key != "clean":
            length = len(prompts[first])
            values = _own_values(
                edit, first, prompt_ids[first], length, 0, engine.prefix_len, engine.device
            )
        cache = _demonstrations(engine, captured, edit, prompts[first], values)
        rows = sorted(rows, key=lambda r: len(prompts[r]))
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            out[batch] = _own_tokens(
                engine, captured, prompts, prompt_ids, edit, cache, batch, [runs[r] for r in batch]
            )
            joblog.advance(len(batch))
    return out


def _demonstrations(engine: Engine, captured, edit, ids, values):
    """The keys and values of the demonstrations (the first ``prefix_len`` tokens of ``ids``),
    from the recorded input of the edit's layer up, with ``values`` edited in (None: as recorded),
    once for every draw; None without demonstrations."""
    from transformers import DynamicCache

    model, draws, site, n_pre = engine.model, edit.draws, edit.site, engine.prefix_len
    if not n_pre:
        return None
    hidden = captured["prefix"].to(engine.device)[None].expand(draws, -1, -1)
    cache = DynamicCache(config=model.config)
    with start_at_layer(model, site, hidden), hooks.edited(model, edit, values):
        model(
            input_ids=engine.ids(ids[:n_pre]).expand(draws, -1),
            use_cache=True,
            logits_to_keep=1,
            **{engine.cache_kw: cache},
        )
    fill_below(cache, site.layer, n_pre)
    return cache


def _own_tokens(engine: Engine, captured, prompts, prompt_ids, edit, cache, batch, runs):
    """(rows, draws, 2) logits of the rows ``batch`` (recorded as ``runs``) with their own tokens
    after the demonstrations run in one batch on copies of ``cache`` (batch = draws)."""
    model, draws, dev, n_pre = engine.model, edit.draws, engine.device, engine.prefix_len
    lengths = [len(prompts[r]) - n_pre for r in batch]
    width = max(lengths)
    hidden = padded_inputs(captured, runs, width).to(dev).repeat(draws, 1, 1)  # draw-major
    ids = [
        np.pad(np.asarray(prompts[r][n_pre:], dtype=np.int64), (0, width - n), mode="edge")
        for r, n in zip(batch, lengths)
    ]
    ids = torch.tensor(np.stack(ids), device=dev).repeat(draws, 1)
    values = _stacked(
        [
            _own_values(edit, r, prompt_ids[r], len(prompts[r]), n_pre, len(prompts[r]), dev)
            for r in batch
        ],
        draws,
        width,
    )
    kwargs = {}
    if cache is not None:
        copied = copy.deepcopy(cache)
        if len(batch) > 1:  # (draws, ...) -> (draws * rows, ...), draw-major
            copied.batch_repeat_interleave(len(batch))
        kwargs = {engine.cache_kw: copied}
    last = torch.tensor(lengths, device=dev).repeat(draws) - 1
    with (
        start_at_layer(model, edit.site, hidden),
        hooks.edited(model, edit, values),
        narrow_lm_head(model, engine.token_ids),
        last_mlp_at(model, edit.site, last),  # only the final positions' logits are read
    ):
        logits = model(input_ids=ids, use_cache=cache is not None, **kwargs).logits
    picked = logits[torch.arange(len(last), device=dev), last].float().cpu().numpy()
    return picked.reshape(draws, len(batch), 2).transpose(1, 0, 2)


@torch.inference_mode()
def partner_patched(
    engine: Engine,
    captured: dict[str, torch.Tensor],
    prompts: list,
    point: str,
    members: dict[HeadSite, list[slice]],
    runs: list[int],
    donors: list[int],
) -> np.ndarray:
    """(n, 1, 2) logits of every row's prompt (``runs``) with the columns ``members`` of each
    layer's ``point`` (hook_z or hook_attn_out) at every position taken from its donor prompt
    (``donors``, as long as the prompt: a pair). The donor runs unedited in the same batch
    (row 0) from the lowest member's layer up, so its output at every member is its clean one,
    and the hook copies it into the prompt's row (row 1)."""
    lowest = min(members, key=lambda s: s.layer)

    def copy_across(cols_list):
        def fn(x):
            y = x.clone()
            for cols in cols_list:
                y[1, :, cols] = x[0, :, cols]
            return y

        return fn

    edits = [hooks.Hook(point, site, copy_across(cols)) for site, cols in members.items()]
    out = np.empty((len(prompts), 1, 2), dtype=np.float64)
    with hooks.hooked(engine.model, *edits):
        for i, ids in enumerate(prompts):
            donor, own = layer_input(captured, donors[i]), layer_input(captured, runs[i])
            if donor.shape != own.shape or own.shape[0] != len(ids):
                raise ValueError("a prompt and its partner must have equally many tokens")
            hidden = torch.stack([donor, own]).to(engine.device)
            with start_at_layer(engine.model, lowest, hidden):
                logits = two_logits(engine, input_ids=engine.ids(ids).expand(2, -1))
            out[i, 0] = logits[1]
            joblog.advance()
    return out


@torch.inference_mode()
def last_layer(
    engine: Engine, state: dict[str, torch.Tensor], prompt_ids: list[int], edit: Edit
) -> np.ndarray:
    """(n, draws, 2) logits with ``edit`` applied to the LAST layer, from its final state
    (:func:`headperturb.model.tail.layer_state`; :func:`headperturb.model.tail.rows_of` for other
    rows)."""
    meta = tail.describe(engine.model, edit.site, engine.token_ids)
    with tail.last_layer(engine.model, edit.site, engine.token_ids) as program:
        return tail.perturbed(program, state, prompt_ids, meta, edit, device=engine.device)


@torch.inference_mode()
def clean_outputs(
    engine: Engine,
    prompts: list,
    site: HeadSite,
    head: int,
    where: str,
    captured: dict[str, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """The head's clean output at every position of every prompt, (length, width) each.

    From the recorded layer input when ``captured`` is given, else from a full forward; the pass
    stops as soon as the site has run.
    """
    cols = site_slice(engine.model, site, head, where)
    seen = {}

    def grab(x):
        seen["x"] = x[0, :, cols].detach().float().cpu().clone()
        raise hooks.Stop

    out = []
    with hooks.hooked(engine.model, hooks.Hook(hooks.AT_SITE[where], site, grab)):
        for i, ids in enumerate(prompts):
            try:
                if captured is None:
                    engine.model(input_ids=engine.ids(ids), use_cache=False, logits_to_keep=1)
                else:
                    hidden = layer_input(captured, i).to(engine.device)[None]
                    with start_at_layer(engine.model, site, hidden):
                        engine.model(input_ids=engine.ids(ids), use_cache=False, logits_to_keep=1)
            except hooks.Stop:
                pass
            out.append(seen.pop("x"))
    return out
