"""The unperturbed model on every prompt: its scores, and what the perturbed passes start from.

Every prompt is ``prefix + query`` (see :mod:`headperturb.data.prompts`). Scores are the next-token
logits of the two verbalizer tokens at the last position.

:class:`Engine` encodes the shared prefix once and runs the queries, in batches, on copies of its
key/value cache, computing only the two verbalizer logits. The same pass records, on request:

- :meth:`Engine.baseline`: the scores, each layer's state at every prompt's final position
  (:class:`FinalState`: the residual stream entering the layer, the o_proj input and output) and
  every head's RMS output at both sites;
- :meth:`Engine.capture_layer_inputs`: the residual stream entering one layer at every position;
- :meth:`Engine.capture_cache`: the keys and values of every layer at every position.

Each method returns what it recorded; the engine keeps no state between calls.
(:mod:`headperturb.model.passes` holds the perturbed passes that start from these recordings.)
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from dataclasses import dataclass

import numpy as np
import torch

from headperturb.joblog import Progress
from headperturb.model import hooks
from headperturb.model.records import KeysValues, RmsSums, final_recorder, full_cache
from headperturb.model.sites import HeadSite, final_norm_name
from headperturb.model.surgery import narrow_lm_head, skip_layers_above, skip_layers_below

log = logging.getLogger(__name__)


def fill_below(cache, layer: int, length: int) -> None:
    """Give the skipped layers below ``layer`` of ``cache`` placeholders of ``length`` positions
    (the prefix's: a sliding-window layer keeps fewer keys, but the positions of the tokens that
    follow are counted from layer 0's length)."""
    keys = cache.layers[layer].keys
    shape = (*keys.shape[:-2], length, keys.shape[-1])
    for below in range(layer):
        zeros = keys.new_zeros(shape)
        cache.update(zeros, zeros, below)


def padded_inputs(recorded: dict[str, torch.Tensor], rows, width: int) -> torch.Tensor:
    """(len(rows), width, d): the recorded layer inputs of prompts ``rows`` at their own positions
    (after the prefix; :meth:`Engine.capture_layer_inputs`), each right-padded to ``width`` with
    its last input (no real position sees a pad)."""
    offsets, out = recorded["offsets"], []
    for i in rows:
        own = recorded["suffix"][offsets[i] : offsets[i + 1]]
        out.append(torch.cat([own, own[-1:].expand(width - own.shape[0], -1)]))
    return torch.stack(out)


@dataclass
class Baseline:
    """What :meth:`Engine.baseline` returns: (n, 2) verbalizer logits, the final state of every
    layer (tensors named as in :data:`FINAL_STATE_KEYS`), one row per (site, layer, head) of
    RMS output and, when asked for, what :meth:`Engine.capture_cache` returns, from the same
    pass."""

    logits: np.ndarray
    final_state: dict[str, torch.Tensor]
    head_rms: list[dict]
    keys_values: dict[str, torch.Tensor] | None = None


FINAL_STATE_KEYS = ("resid", "z", "out")
"""Per layer ``L`` the final state holds ``resid.L`` (n, d_model), the residual stream entering
layer ``L``, ``z.L`` (n, n_heads * head_dim), its o_proj input, and ``out.L`` (n, d_out), its
o_proj output, all at each prompt's final position; ``resid_final`` (n, d_model), the residual
stream entering the final norm there (where the model has a final norm headperturb knows:
:data:`headperturb.model.sites.FINAL_NORMS`); and ``n_tokens`` (n,), the prompt lengths."""


class _Recordings:
    """The recordings the fast passes start from (:class:`Engine`'s, which runs the model): the
    residual stream entering a layer at every position, and every layer's keys and values."""

    @torch.inference_mode()
    def capture_layer_inputs(
        self,
        prompts: list,
        site: HeadSite,
        progress: Progress | None = None,
        batch_size: int = 4,
        start: tuple[HeadSite, dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The residual stream entering ``site.layer`` at every position of every prompt.

        ``start``: a lower layer's site and its recorded inputs (this function's output for the
        same prompts): the layers from there up run on them instead of every layer from the
        embeddings, the same computation (layer K's input is what the layers below computed).

        Returns ``prefix`` (prefix_len, d), ``suffix`` (sum of query lengths, d) and ``offsets``
        (n + 1) into ``suffix``.
        """
        seen, current = {}, {}

        def grab(x):
            seen["x"] = x.detach().float().cpu().clone()

        def feed(x):  # the recorded input of the start layer, for the batch that runs now
            if "idx" not in current:
                return start[1]["prefix"][None].to(x.device)
            return padded_inputs(start[1], current["idx"], x.shape[1]).to(x.device)

        edits = [hooks.Hook("hook_resid_pre", site, grab)]
        if start is not None and not start[0].layer < site.layer:
            raise ValueError(
                f"a recording of layer {site.layer} starts from a lower layer, not {start[0].layer}"
            )
        if start is not None:
            edits.insert(0, hooks.Hook("hook_resid_pre", start[0], feed))
        handles = hooks.attach(self.model, edits)
        suffix, offsets = [], [0]
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(skip_layers_above(self.model, site))  # only its input is read
                if start is not None:
                    stack.enter_context(skip_layers_below(self.model, start[0]))
                    cache = self._prefix_from(start[0], prompts)
                else:
                    cache = self.prefix_cache(prompts)  # the hook records the prefix's layer input
                prefix = seen.pop("x")[0] if cache is not None else torch.empty(0)
                for idx, lengths, _logits, _cache in self.suffix_batches(
                    cache, prompts, batch_size, current
                ):
                    for row, length in enumerate(lengths.tolist()):
                        suffix.append(seen["x"][row, :length])
                        offsets.append(offsets[-1] + length)
                    if progress:
                        progress.update(len(idx))
        finally:
            hooks.detach(handles)
        return {
            "prefix": prefix,
            "suffix": torch.cat(suffix),
            "offsets": torch.tensor(offsets, dtype=torch.int64),
        }

    def _prefix_from(self, start: HeadSite, prompts: list):
        """The demonstrations run from ``start``'s layer up (the layers below skipped, its input
        fed by a hook): their keys and values, or None without demonstrations."""
        from transformers import DynamicCache

        if not self.prefix_len:
            return None
        cache = DynamicCache(config=self.model.config)
        ids = self.ids(prompts[0][: self.prefix_len])
        self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self.cache_kw: cache})
        fill_below(cache, start.layer, self.prefix_len)
        return cache

    @torch.inference_mode()
    def capture_cache(
        self, prompts: list, progress: Progress | None = None, batch_size: int = 4
    ) -> dict[str, torch.Tensor]:
        """The keys and values of every layer at every position of every prompt, as the model's
        cache holds them (after any rotary embedding): ``k.L`` / ``v.L`` (heads, positions,
        head_dim) with the prefix's positions first, then each prompt's query positions;
        ``offsets`` (n + 1) into the query part. Sliding-window layers keep every position."""
        cache = self.prefix_cache(prompts, full=True)
        kv = KeysValues(self.prefix_len, cache)
        for idx, lengths, _logits, batch_cache in self.suffix_batches(
            cache if cache is not None else full_cache(), prompts, batch_size
        ):
            kv.add(lengths, batch_cache)
            if progress:
                progress.update(len(idx))
        return kv.tensors()


class Engine(_Recordings):
    def __init__(self, model, prefix_len: int, label_token_ids: list[int]):
        self.model = model
        self.device = next(model.parameters()).device
        self.prefix_len = int(prefix_len)
        self.token_ids = [int(t) for t in label_token_ids]
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    def ids(self, ids) -> torch.Tensor:
        """One prompt's ids as a (1, length) tensor on the model's device."""
        return torch.tensor(np.asarray(ids, dtype=np.int64), device=self.device)[None, :]

    def prefix_cache(self, prompts, full: bool = False):
        """The shared prefix encoded once; ``full`` keeps every position of sliding-window layers
        too (the mask still applies the window), so the keys and values can be recorded."""
        from transformers import DynamicCache

        prefix = list(prompts[0][: self.prefix_len]) if self.prefix_len else []
        for i, ids in enumerate(prompts):
            if list(ids[: self.prefix_len]) != prefix:
                raise ValueError(f"prompt {i} does not start with the shared prefix")
        if not prefix:
            return None
        cache = DynamicCache() if full else DynamicCache(config=self.model.config)
        self.model(
            input_ids=self.ids(prefix), use_cache=True, logits_to_keep=1, **{self.cache_kw: cache}
        )
        return cache

    def suffix_batches(self, cache, prompts, batch_size: int, lengths_seen: dict | None = None):
        """Yield (indices, lengths, two-logit array, batch cache) for batches of prompts run on
        the prefix cache. ``lengths_seen["lengths"]`` and ``["idx"]`` hold the current batch's query
        lengths and prompts while it runs (for hooks that pick each prompt's final position).

        Queries are right-padded to the longest in the batch: with causal attention no real token
        sees a pad, so each prompt's last real position is exactly what it is alone.
        """
        for start in range(0, len(prompts), batch_size):
            idx = list(range(start, min(start + batch_size, len(prompts))))
            queries = [np.asarray(prompts[i][self.prefix_len :], dtype=np.int64) for i in idx]
            lengths = torch.tensor([len(q) for q in queries], device=self.device)
            width = int(lengths.max())
            padded = np.stack(
                [np.pad(q, (0, width - len(q)), constant_values=q[-1]) for q in queries]
            )
            kwargs, batch_cache = {}, None
            if cache is not None:
                batch_cache = copy.deepcopy(cache)
                if len(idx) > 1:
                    batch_cache.batch_repeat_interleave(len(idx))
                kwargs = {self.cache_kw: batch_cache}
            if lengths_seen is not None:
                lengths_seen["lengths"], lengths_seen["idx"] = lengths, idx
            with narrow_lm_head(self.model, self.token_ids):
                logits = self.model(
                    input_ids=torch.tensor(padded, device=self.device),
                    use_cache=cache is not None,
                    **kwargs,
                ).logits
            rows = torch.arange(len(idx), device=self.device)
            yield idx, lengths, logits[rows, lengths - 1].float().cpu().numpy(), batch_cache

    @torch.inference_mode()
    def score(self, prompts: list, progress: Progress | None = None, batch_size: int = 4):
        """(n, 2) verbalizer logits of the unperturbed model, reusing the prefix's cache."""
        out = np.empty((len(prompts), 2), dtype=np.float64)
        cache = self.prefix_cache(prompts)
        for idx, _lengths, logits, _cache in self.suffix_batches(cache, prompts, batch_size):
            out[idx] = logits
            if progress:
                progress.update(len(idx))
        return out

    @torch.inference_mode()
    def baseline(
        self,
        prompts: list,
        sites: list[HeadSite],
        progress: Progress | None = None,
        batch_size: int = 4,
        keys_values: bool = False,
    ) -> Baseline:
        """The scores, and what the perturbed passes start from (see :class:`Baseline`);
        ``keys_values``: also every layer's keys and values (:attr:`Baseline.keys_values`)."""
        out = np.empty((len(prompts), 2), dtype=np.float64)
        current: dict = {"lengths": None}  # None during the prefix pass
        rms = RmsSums(len(prompts))
        final: dict[str, list[torch.Tensor]] = {}
        recorders = []
        for site in sites:
            recorders += [
                hooks.Hook(
                    "hook_resid_pre", site, final_recorder(final, f"resid.{site.layer}", current)
                ),
                hooks.Hook(
                    "hook_z",
                    site,
                    final_recorder(final, f"z.{site.layer}", current, rms, ("o_proj_input", site)),
                ),
                hooks.Hook(
                    "hook_attn_out",
                    site,
                    final_recorder(
                        final, f"out.{site.layer}", current, rms, ("o_proj_output", site)
                    ),
                ),
            ]
        if final_norm_name(self.model) is not None:  # what the unembedding reads: direct effects
            recorders.append(
                hooks.Hook("hook_resid_final", None, final_recorder(final, "resid_final", current))
            )
        handles = hooks.attach(self.model, recorders)
        try:
            cache = self.prefix_cache(prompts, full=keys_values)
            kv = KeysValues(self.prefix_len, cache) if keys_values else None
            if cache is None and kv is not None:
                cache = full_cache()
            for idx, lengths, logits, batch_cache in self.suffix_batches(
                cache, prompts, batch_size, current
            ):
                out[idx] = logits
                if kv is not None:
                    kv.add(lengths, batch_cache)
                if progress:
                    progress.update(len(idx))
        finally:
            hooks.detach(handles)
        state = {key: torch.cat(rows) for key, rows in final.items()}
        state["n_tokens"] = torch.tensor([len(ids) for ids in prompts], dtype=torch.int64)
        return Baseline(out, state, rms.rows(), kv.tensors() if kv is not None else None)


def on_device(values: tuple, device) -> tuple:
    """An edit's values (one tensor per member) on ``device``."""
    return tuple(v.to(device) for v in values)


def two_logits(engine: Engine, **inputs) -> np.ndarray:
    """(batch, 2) verbalizer logits at the last position, computing only those two rows."""
    with narrow_lm_head(engine.model, engine.token_ids):
        logits = engine.model(use_cache=False, logits_to_keep=1, **inputs).logits
    return logits[:, -1, :].float().cpu().numpy()
