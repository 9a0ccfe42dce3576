"""The final token alone through the layers above an edit of the final position.

An edit of the final position alone (``positions: last``) at layer ``L`` leaves every earlier
position's keys and values unchanged at every layer. So :func:`final_position` runs the final
token alone through layers ``>= L``, from the residual stream recorded there
(:meth:`~headperturb.model.engine.Engine.baseline`), attending to the recorded keys and values
(:meth:`~headperturb.model.engine.Engine.capture_cache`): one token per prompt and draw, batched.
:class:`_PastLayer` hands each layer its rows' pasts, gathered from the recording as it asks.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from headperturb.model import hooks
from headperturb.model.engine import Engine, on_device, two_logits
from headperturb.model.hooks import Edit, start_at_layer
from headperturb.model.surgery import stand_in_embeddings


class _PastLayer(DynamicLayer):
    """One layer's recorded keys and values for a batch of final tokens. Each row's past (its
    prompt's every position but the last, left-padded to ``plan["length"]``) is gathered with one
    index per row from the recorded tensors when the layer asks for it, into a buffer the batch's
    layers share, so only one layer's batch is in memory at a time. Layers below the perturbed
    one are skipped and only report the past's length (``keys`` None)."""

    def __init__(self, keys, values, plan: dict):
        super().__init__()
        self.source, self.plan = (keys, values), plan
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.plan["length"]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.plan["length"] + query_length, 0

    def update(self, key_states, value_states, *args, **kwargs):
        if self.source[0] is None:
            raise RuntimeError("a skipped layer's past was asked for")
        return tuple(
            self._assemble(new, source, which)
            for new, source, which in zip((key_states, value_states), self.source, "kv")
        )

    def _assemble(self, new: torch.Tensor, source: torch.Tensor, which: str) -> torch.Tensor:
        rows, heads, q, dim = new.shape
        length = self.plan["length"]
        buffers = self.plan["buffers"]
        if which not in buffers or buffers[which].dtype != new.dtype:
            buffers[which] = new.new_empty(rows, heads, length + q, dim)
        out = buffers[which]
        index = self.plan["index"] + (torch.arange(heads) * source.shape[1])[None, :, None]
        flat = source.to(new.dtype).reshape(-1, dim)  # (heads * positions, dim)
        torch.index_select(flat, 0, index.reshape(-1), out=out.view(-1, dim))
        out[:, :, length:] = new
        return out


def _gather_plan(
    kv: dict[str, torch.Tensor], idx: list[int], lengths: list[int], draws: int
) -> dict:
    """Where each row's past lies in the recorded keys and values: for every row (``draws`` per
    recorded prompt of ``idx``), its prompt's positions but the last, left-padded to the longest,
    then a slot for the final token. Pads point at position 0: a real key, which the mask hides."""
    prefix_len, offsets = int(kv["prefix_len"][0]), kv["offsets"]
    length = max(lengths[i] for i in idx) - 1
    rows = []
    for i in idx:
        own = torch.arange(prefix_len + int(offsets[i]), prefix_len + int(offsets[i + 1]) - 1)
        past = torch.cat([torch.arange(prefix_len), own])
        pad = torch.zeros(length - len(past), dtype=torch.long)
        rows += [torch.cat([pad, past, torch.zeros(1, dtype=torch.long)])] * draws  # + the new slot
    return {"index": torch.stack(rows)[:, None, :], "length": length, "buffers": {}}


@torch.inference_mode()
def final_position(
    engine: Engine,
    state: dict[str, torch.Tensor],
    kv: dict[str, torch.Tensor],
    prompt_ids: list[int],
    edit: Edit,
    rows_per_batch: int = 256,
    runs: list[int] | None = None,
) -> np.ndarray:
    """(n, draws, 2) logits with ``edit`` applied to the final position of layer ``L`` only:
    the final token alone through layers >= L, with every earlier position's recorded keys and
    values. ``state`` is the baseline's final state (all layers), ``kv`` the recorded cache;
    ``runs`` says which recorded prompt each row is (default: row i is prompt i)."""
    if edit.position != "last":
        raise ValueError("final_position() perturbs the final position only (positions: last)")
    layer, model, draws = edit.site.layer, engine.model, edit.draws
    n_layers = len(model.get_submodule(edit.site.layers_path))
    runs = list(range(len(prompt_ids))) if runs is None else list(runs)
    lengths = state["n_tokens"].tolist()
    out = np.empty((len(prompt_ids), draws, 2), dtype=np.float64)
    step = max(1, rows_per_batch // draws)
    for start in range(0, len(prompt_ids), step):
        rows = list(range(start, min(start + step, len(prompt_ids))))
        idx = [runs[r] for r in rows]
        plan = _gather_plan(kv, idx, lengths, draws)
        past = plan["length"]
        layers = [
            _PastLayer(*((kv[f"k.{lay}"], kv[f"v.{lay}"]) if lay >= layer else (None, None)), plan)
            for lay in range(n_layers)
        ]
        mask = torch.ones(len(idx) * draws, past + 1, dtype=torch.long)
        for row, i in enumerate(idx):
            mask[row * draws : (row + 1) * draws, : past - (lengths[i] - 1)] = 0
        positions = torch.tensor([lengths[i] - 1 for i in idx]).repeat_interleave(draws)[:, None]
        hidden = state[f"resid.{layer}"][idx].repeat_interleave(draws, dim=0)[:, None, :]
        per_row = [edit.values_for(r, prompt_ids[r], lengths[i]) for r, i in zip(rows, idx)]
        values = tuple(
            torch.cat([v[m].expand(draws, -1, -1) for v in per_row])
            for m in range(len(edit.members))
        )
        dev = engine.device
        with (
            stand_in_embeddings(model),
            start_at_layer(model, edit.site, hidden.to(dev)),
            hooks.edited(model, edit, on_device(values, dev)),
        ):
            logits = two_logits(
                engine,
                input_ids=torch.zeros(len(idx) * draws, 1, dtype=torch.long, device=dev),
                attention_mask=mask.to(dev),
                position_ids=positions.to(dev),
                **{engine.cache_kw: Cache(layers=layers)},
            )
        out[rows] = logits.reshape(len(idx), draws, 2)
    return out
