"""Forward passes that score prompts, with and without a perturbed head.

Every prompt is ``prefix + query`` (see :mod:`headperturb.prompts`). Scores are the next-token
logits of the two verbalizer tokens at the last position.

Reference method (:meth:`Engine.perturbed_naive`): a full forward pass over the whole prompt with
the noise hook active, all noise draws of a prompt in one batch.

Fast method, which gives the same numbers (the equivalence tests check it to 1e-4) with less work:

- :meth:`Engine.baseline` encodes the shared prefix once and runs the queries, in batches, on
  copies of its key/value cache, computing only the two verbalizer logits. It also records, at the final
  position of every prompt, the residual stream entering the last layer and that layer's o_proj
  input (:data:`FINAL_STATE`).
- Last layer: only the final position's output reaches the logits, and noise added after the
  attention does not change the keys and values of that layer. So :meth:`Engine.perturbed_last`
  runs only the last layer, on one position per prompt, from the recorded state: every prompt and
  draw in one batch, through :class:`headperturb.tail.LastLayer`, the same module the baseline
  exports as a program for the perturbation jobs.
- Other layers: every layer before ``L`` computes exactly what the baseline computed.
  :meth:`Engine.capture_layer_inputs` records the residual stream entering ``L`` at every position
  (the prefix once), and :meth:`Engine.perturbed_from_layer` runs only layers ``>= L``.

The fast paths run the model's own modules through its own ``forward``: layers below ``L`` are
swapped for a pass-through, the input of layer ``L`` is replaced by the recorded residual stream,
and (last layer) the input of o_proj by the recorded head outputs, edited as the reference method's
hook edits them. The LM head is narrowed to the two verbalizer rows while scoring.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from collections.abc import Iterator

import numpy as np
import torch

from . import tail
from .intervention import noise_values, perturb_head, site_slice
from .logs import Progress
from .sites import HeadSite
from .tail import _PassThrough, narrow_lm_head

log = logging.getLogger(__name__)

FINAL_STATE = ("resid_final", "z_final", "out_final", "last_token", "n_tokens")
"""What the baseline records at each prompt's final position: the residual stream entering the last
layer, that layer's o_proj input and output, the last token and the prompt length."""


def _replace_input(value: torch.Tensor):
    """A forward pre-hook (with kwargs) that replaces a module's first input by ``value``."""

    def hook(_module, args, kwargs):
        if args:
            return (value.to(args[0].dtype), *args[1:]), kwargs
        key = next(iter(kwargs))
        kwargs[key] = value.to(kwargs[key].dtype)
        return args, kwargs

    return hook


@contextlib.contextmanager
def start_at_layer(model, site: HeadSite, hidden: torch.Tensor) -> Iterator[None]:
    """While active, the model's forward skips the layers below ``site.layer`` and feeds
    ``hidden`` (batch, seq, d_model) into that layer."""
    layers = model.get_submodule(site.layers_path)
    originals = [layers[i] for i in range(site.layer)]
    for i, layer in enumerate(originals):
        layers[i] = _PassThrough(layer)
    handle = layers[site.layer].register_forward_pre_hook(_replace_input(hidden), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for i, layer in enumerate(originals):
            layers[i] = layer


class Engine:
    def __init__(self, model, prefix_len: int, label_token_ids: list[int]):
        self.model = model
        self.device = next(model.parameters()).device
        self.prefix_len = int(prefix_len)
        self.token_ids = [int(t) for t in label_token_ids]
        self.label_ids = torch.tensor(self.token_ids, device=self.device)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def width(self, site: HeadSite, head: int, where: str) -> int:
        """How many columns head ``head`` owns at ``where``."""
        return _width(self.model, site, head, where)

    # -- helpers ---------------------------------------------------------------------------
    def _ids(self, ids) -> torch.Tensor:
        return torch.tensor(np.asarray(ids, dtype=np.int64), device=self.device)[None, :]

    def _labels(self, logits: torch.Tensor) -> np.ndarray:
        return logits[:, -1, :].index_select(-1, self.label_ids).float().cpu().numpy()

    def _two_logits(self, **inputs) -> np.ndarray:
        """(batch, 2) verbalizer logits at the last position, computing only those two rows."""
        with narrow_lm_head(self.model, self.token_ids):
            logits = self.model(use_cache=False, logits_to_keep=1, **inputs).logits
        return logits[:, -1, :].float().cpu().numpy()

    def _prefix_cache(self, prompts):
        from transformers import DynamicCache

        prefix = list(prompts[0][: self.prefix_len]) if self.prefix_len else []
        for i, ids in enumerate(prompts):
            if list(ids[: self.prefix_len]) != prefix:
                raise ValueError(f"prompt {i} does not start with the shared prefix")
        if not prefix:
            return None
        cache = DynamicCache(config=self.model.config)
        self.model(
            input_ids=self._ids(prefix), use_cache=True, logits_to_keep=1, **{self._cache_kw: cache}
        )
        return cache

    def _suffix_batches(self, cache, prompts, batch_size: int):
        """Yield (indices, lengths, two-logit array) for batches of prompts run on the prefix cache.

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
            kwargs = {}
            if cache is not None:
                batch_cache = copy.deepcopy(cache)
                if len(idx) > 1:
                    batch_cache.batch_repeat_interleave(len(idx))
                kwargs = {self._cache_kw: batch_cache}
            self._lengths = lengths
            with narrow_lm_head(self.model, self.token_ids):
                logits = self.model(
                    input_ids=torch.tensor(padded, device=self.device),
                    use_cache=cache is not None,
                    **kwargs,
                ).logits
            rows = torch.arange(len(idx), device=self.device)
            yield idx, lengths, logits[rows, lengths - 1].float().cpu().numpy()

    # -- baseline ----------------------------------------------------------------------------
    @torch.inference_mode()
    def baseline(
        self,
        prompts: list,
        progress: Progress | None = None,
        record: HeadSite | None = None,
        batch_size: int = 4,
        rms_sites: list[HeadSite] | None = None,
    ) -> tuple[np.ndarray, dict[str, torch.Tensor] | None]:
        """(n, 2) verbalizer logits of the unperturbed model, reusing the prefix's cache.

        With ``record`` (the site of the last layer), also return the final-position state that
        :meth:`perturbed_last` needs (:data:`FINAL_STATE`). With ``rms_sites``, also measure each
        head's RMS output at both sites over every position of every prompt (:meth:`head_rms`).
        """
        out = np.empty((len(prompts), 2), dtype=np.float64)
        rms_handles, self._rms_sums = self._rms_hooks(rms_sites or [], len(prompts))
        try:
            self._lengths = None  # the prefix pass
            cache = self._prefix_cache(prompts)
        except BaseException:
            for handle in rms_handles:
                handle.remove()
            raise
        seen: dict[str, torch.Tensor] = {}
        handles = list(rms_handles)
        if record is not None:
            layer = self.model.get_submodule(record.layers_path)[record.layer]
            proj = self.model.get_submodule(record.module_name)

            def final(name, x):
                rows = torch.arange(x.shape[0], device=x.device)
                seen[name] = x[rows, self._lengths - 1].detach().float().cpu().clone()

            def grab(name):
                def hook(_m, args, kwargs):
                    final(name, args[0] if args else next(iter(kwargs.values())))

                return hook

            handles += [
                layer.register_forward_pre_hook(grab("resid"), with_kwargs=True),
                proj.register_forward_pre_hook(grab("z"), with_kwargs=True),
                proj.register_forward_hook(lambda _m, _args, out: final("out", out)),
            ]
        recorded = {"resid": [], "z": [], "out": []}
        try:
            for idx, _lengths, logits in self._suffix_batches(cache, prompts, batch_size):
                out[idx] = logits
                if record is not None:
                    for name, rows in recorded.items():
                        rows.append(seen[name])
                if progress:
                    progress.update(len(idx))
        finally:
            for handle in handles:
                handle.remove()
        if record is None:
            return out, None
        state = {
            "resid_final": torch.cat(recorded["resid"]),
            "z_final": torch.cat(recorded["z"]),
            "out_final": torch.cat(recorded["out"]),
            "last_token": torch.tensor([int(ids[-1]) for ids in prompts], dtype=torch.int64),
            "n_tokens": torch.tensor([len(ids) for ids in prompts], dtype=torch.int64),
        }
        return out, state

    def _rms_hooks(self, sites: list[HeadSite], n_prompts: int):
        """Hooks that add up each head's squared output at both sites; the shared prefix counts
        once per prompt, padded positions not at all."""
        sums: dict[tuple[str, int], list] = {}
        handles = []

        def accumulate(key, n_heads, x):
            x = x.detach().float()
            if self._lengths is None:  # the prefix, shared by every prompt
                sq, count = x[0].pow(2).sum(0) * n_prompts, x.shape[1] * n_prompts
            else:
                valid = torch.arange(x.shape[1], device=x.device)[None, :] < self._lengths[:, None]
                sq = (x.pow(2) * valid[..., None]).sum((0, 1))
                count = int(valid.sum())
            per_head = sq.reshape(n_heads, -1).sum(-1).double().cpu()
            entry = sums.setdefault(key, [torch.zeros(n_heads, dtype=torch.float64), 0, 0])
            entry[0] += per_head
            entry[1] += count
            entry[2] = sq.numel() // n_heads

        for site in sites:
            module = self.model.get_submodule(site.module_name)
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, s=site: accumulate(("o_proj_input", s.layer), s.n_heads, args[0])))  # fmt: skip
            handles.append(module.register_forward_hook(
                lambda _m, _a, out, s=site: accumulate(("o_proj_output", s.layer), s.n_heads, out)))  # fmt: skip
        return handles, sums

    def head_rms(self) -> list[dict]:
        """Rows (site, layer, head, rms) measured by the last :meth:`baseline` with rms_sites."""
        rows = []
        for (where, layer), (sq, count, width) in sorted(self._rms_sums.items()):
            for head, value in enumerate((sq / max(count * width, 1)).sqrt().tolist()):
                rows.append({"site": where, "layer": layer, "head": head, "rms": value})
        return rows

    @torch.inference_mode()
    def full(self, ids, batch: int = 1) -> np.ndarray:
        """(batch, 2) verbalizer logits of a plain full forward over the whole prompt."""
        inputs = self._ids(ids).expand(batch, -1)
        return self._labels(self.model(input_ids=inputs, use_cache=False, logits_to_keep=1).logits)

    # -- reference method ----------------------------------------------------------------------
    def _values(self, site, head, where, scale, draws, seed, values):
        """The per-prompt perturbation values: ``values`` when given, else Gaussian noise."""
        if values is not None:
            return values
        width = _width(self.model, site, head, where)
        return noise_values(seed=seed, layer=site.layer, head=head, scale=scale, draws=draws,
                            width=width)  # fmt: skip

    @torch.inference_mode()
    def perturbed_naive(
        self,
        prompts: list,
        prompt_ids: list[int],
        *,
        site: HeadSite,
        head: int,
        where: str,
        draws: int,
        scale: float = 0.0,
        seed: int = 0,
        values=None,
        mode: str = "add",
        progress: Progress | None = None,
    ) -> np.ndarray:
        """(n, draws, 2) verbalizer logits with head ``head`` perturbed: full forward passes.

        ``values(index, prompt_id, length)`` gives the (draws, length, width) tensor that is
        added (``mode="add"``) or set (``"set"``); by default seeded noise of ``scale``.
        """
        values = self._values(site, head, where, scale, draws, seed, values)
        out = np.empty((len(prompts), draws, 2), dtype=np.float64)
        for i, (ids, pid) in enumerate(zip(prompts, prompt_ids)):
            v = values(i, pid, len(ids)).to(self.device)
            with perturb_head(self.model, site, head, v, where, mode):
                out[i] = self.full(ids, batch=draws)
            if progress:
                progress.update()
        return out

    # -- fast methods --------------------------------------------------------------------------
    @torch.inference_mode()
    def perturbed_last(
        self,
        state: dict[str, torch.Tensor],
        prompt_ids: list[int],
        *,
        site: HeadSite,
        head: int,
        where: str,
        draws: int,
        scale: float = 0.0,
        seed: int = 0,
        values=None,
        mode: str = "add",
    ) -> np.ndarray:
        """(n, draws, 2) logits with a head of the LAST layer perturbed, from the final state."""
        meta = tail.describe(self.model, site, self.token_ids)
        with tail.last_layer(self.model, site, self.token_ids) as program:
            return tail.perturbed(program, state, prompt_ids, meta, head=head, where=where,
                                  draws=draws, scale=scale, seed=seed, values=values, mode=mode,
                                  device=self.device)  # fmt: skip

    def final_activations(
        self, state: dict[str, torch.Tensor], site: HeadSite, head: int, where: str
    ) -> list[torch.Tensor]:
        """The head's clean output at each prompt's final position, (1, width) each, from the
        baseline's final state (the last layer)."""
        meta = tail.describe(self.model, site, self.token_ids)
        return [row[None].clone() for row in tail.clean_outputs(state, meta, head, where)]

    @torch.inference_mode()
    def head_activations(
        self,
        prompts: list,
        site: HeadSite,
        head: int,
        where: str,
        captured: dict[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """The head's clean output at every position of every prompt, (length, width) each.

        From the recorded layer input when ``captured`` is given, else from a full forward; the
        pass stops as soon as the site has run.
        """
        cols = site_slice(self.model, site, head, where)
        module = self.model.get_submodule(site.module_name)
        seen = {}

        def grab(x):
            seen["x"] = x[0, :, cols].detach().float().cpu().clone()
            raise _Stop

        if where == "o_proj_input":
            handle = module.register_forward_pre_hook(lambda _m, args: grab(args[0]))
        else:
            handle = module.register_forward_hook(lambda _m, _args, out: grab(out))
        out = []
        offsets = captured["offsets"].tolist() if captured is not None else None
        try:
            for i, ids in enumerate(prompts):
                try:
                    if captured is None:
                        self.model(input_ids=self._ids(ids), use_cache=False, logits_to_keep=1)
                    else:
                        hidden = _layer_input(captured, offsets, i)
                        with start_at_layer(self.model, site, hidden.to(self.device)[None]):
                            self.model(input_ids=self._ids(ids), use_cache=False, logits_to_keep=1)
                except _Stop:
                    pass
                out.append(seen.pop("x"))
        finally:
            handle.remove()
        return out

    @torch.inference_mode()
    def capture_layer_inputs(
        self, prompts: list, site: HeadSite, progress: Progress | None = None, batch_size: int = 4
    ) -> dict[str, torch.Tensor]:
        """The residual stream entering ``site.layer`` at every position of every prompt.

        Returns ``prefix`` (prefix_len, d), ``suffix`` (sum of query lengths, d) and ``offsets``
        (n + 1) into ``suffix``. Layers from ``site.layer`` on are skipped where possible.
        """
        layer = self.model.get_submodule(site.layers_path)[site.layer]
        seen = {}

        def grab(_m, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            seen["x"] = x.detach().float().cpu().clone()

        handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
        suffix, offsets = [], [0]
        try:
            cache = self._prefix_cache(prompts)  # the hook records the prefix's layer input
            prefix = seen.pop("x")[0] if cache is not None else torch.empty(0)
            for idx, lengths, _logits in self._suffix_batches(cache, prompts, batch_size):
                for row, length in enumerate(lengths.tolist()):
                    suffix.append(seen["x"][row, :length])
                    offsets.append(offsets[-1] + length)
                if progress:
                    progress.update(len(idx))
        finally:
            handle.remove()
        return {
            "prefix": prefix,
            "suffix": torch.cat(suffix),
            "offsets": torch.tensor(offsets, dtype=torch.int64),
        }

    @torch.inference_mode()
    def perturbed_from_layer(
        self,
        captured: dict[str, torch.Tensor],
        prompts: list,
        prompt_ids: list[int],
        *,
        site: HeadSite,
        head: int,
        where: str,
        draws: int,
        scale: float = 0.0,
        seed: int = 0,
        values=None,
        mode: str = "add",
        progress: Progress | None = None,
    ) -> np.ndarray:
        """(n, draws, 2) logits with a head of any layer perturbed, running only layers >= L."""
        values = self._values(site, head, where, scale, draws, seed, values)
        out = np.empty((len(prompts), draws, 2), dtype=np.float64)
        offsets = captured["offsets"].tolist()
        for i, (ids, pid) in enumerate(zip(prompts, prompt_ids)):
            hidden = _layer_input(captured, offsets, i)
            if hidden.shape[0] != len(ids):
                raise ValueError(
                    f"the layer input recorded for prompt {pid} does not match its length"
                )
            hidden = hidden.to(self.device)[None].expand(draws, -1, -1)
            v = values(i, pid, len(ids)).to(self.device)
            with (
                start_at_layer(self.model, site, hidden),
                perturb_head(self.model, site, head, v, where, mode),
            ):
                out[i] = self._two_logits(input_ids=self._ids(ids).expand(draws, -1))
            if progress:
                progress.update()
        return out


class _Stop(Exception):
    """Ends a forward pass early, once a hook has what it needs."""


def _layer_input(captured: dict[str, torch.Tensor], offsets: list[int], i: int) -> torch.Tensor:
    """Prompt ``i``'s recorded layer input: the shared prefix, then its own query positions."""
    return torch.cat([captured["prefix"], captured["suffix"][offsets[i] : offsets[i + 1]]])


def _width(model, site: HeadSite, head: int, where: str) -> int:
    cols = site_slice(model, site, head, where)
    return cols.stop - cols.start
