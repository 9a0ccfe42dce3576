"""The last layer as a standalone program: what a last-layer perturbation job runs.

At the last layer only the final position reaches the logits, and a change made after the
attention does not change that layer's keys and values. So scoring a prompt with a head of the last
layer perturbed needs only two vectors the baseline records at the prompt's final position (the
residual stream entering the layer, ``resid``, and the layer's o_proj input, ``z``; see
:data:`headperturb.model.engine.FINAL_STATE_KEYS`) and the part of the model that maps them to
the two verbalizer logits: the last layer, the final norm and two rows of the LM head.

That part is :class:`LastLayer`: the model's own modules run through the model's own ``forward``
(the layers below are swapped for pass-throughs, the embedding table for a one-row stand-in, and
hooks feed ``resid`` to the layer and ``z`` to o_proj), so nothing is re-derived per family. Its
signature::

    program(resid, z, keep_in, add_in, keep_out, add_out) -> (batch, 2) float32 logits

    resid    (batch, 1, d_model)            residual stream entering the last layer, final position
    z        (batch, 1, n_heads * head_dim) the o_proj input there (clean)
    keep_in, add_in    same shape as z      the o_proj input becomes z * keep_in + add_in
    keep_out, add_out  (batch, 1, d_out)    the o_proj output becomes out * keep_out + add_out

A head's perturbation is an edit of its columns (:func:`edits`), read off its kind's function
(:meth:`headperturb.core.kinds.Perturbation.apply`, affine in the head's output): noise is
``keep = 1, add = noise`` (exactly ``x + noise``), an ablation ``keep = 0, add = value`` (exactly
``value``), at the site the config names; every other column is ``keep = 1, add = 0``, unchanged.

The baseline exports it with :func:`torch.export.export` (a dynamic batch dimension) and saves it
(:func:`save`): a few MB, the last layer's weights only. A perturbation job loads it with torch
alone (:func:`load`), without transformers and without the model, and evaluates every prompt and
draw in one call. The engine runs the same module eagerly when no program is available, and the
equivalence tests check both against full forward passes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from headperturb.core import files, hints
from headperturb.model import hooks
from headperturb.model.hooks import Edit, head_columns
from headperturb.model.sites import HeadSite
from headperturb.model.surgery import (
    narrow_lm_head,
    out_features,
    skip_layers_below,
    stand_in_embeddings,
)

log = logging.getLogger(__name__)

PROGRAM = "program.pt2"
META = "program.json"
INPUTS = ("resid", "z", "keep_in", "add_in", "keep_out", "add_out")


class LastLayer(torch.nn.Module):
    """``program(resid, z, keep_in, add_in, keep_out, add_out)`` on a model prepared by
    :func:`last_layer` (see the module docstring)."""

    def __init__(self, model, site: HeadSite):
        super().__init__()
        self.model = model
        self.dtype = next(model.parameters()).dtype
        self._inputs: dict[str, torch.Tensor] = {}
        self._handles = hooks.attach(
            model,
            [
                hooks.Hook("hook_resid_pre", site, lambda _x: self._inputs["resid"]),
                hooks.Hook("hook_z", site, self._proj_input),
                hooks.Hook("hook_attn_out", site, self._proj_output),
            ],
        )

    def _proj_input(self, _z):
        x = self._inputs
        return x["z"] * x["keep_in"] + x["add_in"]

    def _proj_output(self, out):
        return out * self._inputs["keep_out"] + self._inputs["add_out"]

    def forward(self, resid, z, keep_in, add_in, keep_out, add_out):
        values = dict(zip(INPUTS, (resid, z, keep_in, add_in, keep_out, add_out)))
        self._inputs = {k: v.to(self.dtype) for k, v in values.items()}
        try:
            out = self.model(
                inputs_embeds=self._inputs["resid"], use_cache=False, logits_to_keep=1
            ).logits
        finally:
            self._inputs = {}
        return out[:, -1, :].float()

    def remove_hooks(self) -> None:
        hooks.detach(self._handles)


@contextlib.contextmanager
def last_layer(model, site: HeadSite, token_ids: list[int]) -> Iterator[LastLayer]:
    """While active, ``model`` is cut down to its last layer and two LM-head rows, and the yielded
    :class:`LastLayer` runs it. Everything is restored afterwards, also on an exception."""
    layers = model.get_submodule(site.layers_path)
    if site.layer != len(layers) - 1:
        raise ValueError(f"layer {site.layer} is not the last layer ({len(layers) - 1})")
    with (
        skip_layers_below(model, site),
        stand_in_embeddings(model),
        narrow_lm_head(model, token_ids),
    ):
        program = LastLayer(model, site)
        try:
            yield program
        finally:
            program.remove_hooks()


def layer_state(state: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """One layer's final state (``resid``, ``z``, ``out``: (n, width) each) from the baseline's
    (:data:`headperturb.model.engine.FINAL_STATE_KEYS`), with ``n_tokens``."""
    from headperturb.model.engine import FINAL_STATE_KEYS

    return {
        **{key: state[f"{key}.{layer}"] for key in FINAL_STATE_KEYS},
        "n_tokens": state["n_tokens"],
    }


def rows_of(state: dict[str, torch.Tensor], runs: list[int] | None) -> dict[str, torch.Tensor]:
    """One layer's final state (:func:`layer_state`) for the recorded prompts ``runs``, in that
    order (None: all, as recorded)."""
    if runs is None:
        return state
    index = torch.as_tensor(list(runs), dtype=torch.long)
    return {key: value[index] for key, value in state.items()}


def example_inputs(state: dict[str, torch.Tensor], d_out: int, device, rows: int = 2) -> tuple:
    """Unperturbed program inputs for the first ``rows`` prompts of one layer's final state."""
    resid = state["resid"][:rows, None, :].to(device)
    z = state["z"][:rows, None, :].to(device)
    out = torch.zeros(z.shape[0], 1, d_out, device=device)
    return resid, z, torch.ones_like(z), torch.zeros_like(z), out + 1, out


@torch.inference_mode(False)
def export(model, site: HeadSite, token_ids: list[int], state: dict[str, torch.Tensor]):
    """The :class:`LastLayer` program of ``model`` as a :class:`torch.export.ExportedProgram`
    with a dynamic batch dimension; ``state`` is the last layer's final state
    (:func:`layer_state`), whose first prompts serve as example inputs."""
    d_out = out_features(model, site)
    device = next(model.parameters()).device
    with torch.no_grad(), last_layer(model, site, token_ids) as program:
        inputs = example_inputs(state, d_out, device, rows=max(2, min(4, len(state["z"]))))
        batch = torch.export.Dim("batch", min=1)
        return torch.export.export(
            program, inputs, dynamic_shapes=tuple({0: batch} for _ in INPUTS), strict=False
        )


def save(folder: str | os.PathLike, exported, meta: dict) -> None:
    """Write ``program.pt2`` (when ``exported`` is not None) and ``program.json`` into ``folder``,
    built beside it and renamed into place complete. Two saves of one program give the same
    bytes (:func:`_save_program`)."""
    with files.atomic_dir(folder) as tmp:
        meta = {**meta, "exported": exported is not None}
        if exported is not None:
            _save_program(exported, tmp / PROGRAM)
            meta["program_sha256"] = files.sha256_file(tmp / PROGRAM)
        meta["meta_sha256"] = _meta_digest(meta)
        files.write_json(tmp / META, meta)


def _meta_digest(meta: dict) -> str:
    """The sha256 of ``program.json``'s values but this one: the head's columns come from them."""
    import hashlib
    import json

    rest = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _save_program(exported, path: Path) -> None:
    """``torch.export.save``, then the one random thing in the archive, its serialization id,
    replaced by a digest of the rest, so that two saves of one program give the same bytes."""
    torch.export.save(exported, str(path))
    _stable_serialization_id(path)


def _stable_serialization_id(path: Path) -> None:
    """Rewrite the archive's ``.data/serialization_id`` record in place (same length) with a
    number derived from every other record, and its CRC-32 wherever the archive stores it."""
    import hashlib
    import struct
    import zipfile
    import zlib

    with zipfile.ZipFile(path) as archive:
        records = archive.infolist()
        entry = next((r for r in records if r.filename.endswith(".data/serialization_id")), None)
        if entry is None:
            return
        digest = hashlib.sha256()
        for record in records:
            if record is not entry:
                digest.update(record.filename.encode() + archive.read(record.filename))
        old = archive.read(entry.filename)
        central = archive.start_dir
    new = str(int(digest.hexdigest(), 16)).encode()[: len(old)].rjust(len(old), b"0")
    old_crc, new_crc = (struct.pack("<I", zlib.crc32(x)) for x in (old, new))
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack(
        "<HH", data[entry.header_offset + 26 : entry.header_offset + 30]
    )
    start = entry.header_offset + 30 + name_len + extra_len
    if bytes(data[start : start + len(old)]) != old:
        raise RuntimeError(f"unexpected layout of {path}: serialization id not where expected")
    data[start : start + len(old)] = new
    local = slice(entry.header_offset, start + len(old) + 16)  # header and data descriptor
    data[local] = bytes(data[local]).replace(old_crc, new_crc)
    offset = central
    while data[offset : offset + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack("<HHH", data[offset + 28 : offset + 34])
        if data[offset + 46 : offset + 46 + n].decode() == entry.filename:
            data[offset + 16 : offset + 20] = new_crc
        offset += 46 + n + m + k
    path.write_bytes(bytes(data))


def load(folder: str | os.PathLike, device: str, weights_sha256: str | None = None):
    """(callable program, meta) from ``folder``, or (None, reason) when there is no program for
    ``device`` (none was exported, or it was exported for another device). The program must be
    what ``program.json`` says (its sha256) and, given ``weights_sha256``, exported from those
    weights; otherwise :class:`headperturb.model.recordings.RecordingError` names the folder and
    the fix."""
    from headperturb.model.recordings import RecordingError

    folder = Path(folder)
    meta = files.read_json(folder / META)
    if meta.get("meta_sha256") != _meta_digest(meta):
        raise files.unreadable(folder / META, ValueError("its values do not match its checksum"))
    meta = {k: v for k, v in meta.items() if k != "meta_sha256"}
    if not meta.get("exported"):
        return None, f"no program was exported ({meta.get('reason', 'unknown reason')})"
    if weights_sha256 and meta.get("weights_sha256") != weights_sha256:
        raise RecordingError(
            f"{folder} was exported from other model weights than this run's (weights_sha256 "
            f"{str(meta.get('weights_sha256'))[:16]}, this run's {weights_sha256[:16]}): it "
            f"belongs to another run or is stale. Remake it with "
            f"`{hints.command('--forcerun', str(folder))}`"
        )
    if not same_device(meta["device"], device):
        return None, f"the program was exported on {meta['device']}, this job runs on {device}"
    found = files.sha256_file(folder / PROGRAM) if (folder / PROGRAM).is_file() else None
    if found is None or found != meta.get("program_sha256"):
        raise files.unreadable(
            folder / PROGRAM, ValueError("its sha256 is not the one program.json records")
        )
    return torch.export.load(str(folder / PROGRAM)).module(), meta


def same_device(a: str, b: str) -> bool:
    """Whether two device names mean the same device: ``cuda`` is ``cuda:0``."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def describe(
    model, site: HeadSite, token_ids: list[int], device: str | None = None, dtype: str | None = None
) -> dict:
    """What a perturbation job needs to know about the program besides its inputs."""
    return {
        "layer": site.layer,
        "n_heads": site.n_heads,
        "head_dim": site.head_dim,
        "d_model": int(model.get_input_embeddings().embedding_dim),
        "d_out": out_features(model, site),
        "token_ids": [int(t) for t in token_ids],
        "device": device,
        "dtype": dtype,
    }


def columns(meta: dict, head: int, where: str) -> slice:
    """Head ``head``'s columns at ``where`` (:func:`headperturb.model.hooks.head_columns`)."""
    return head_columns(
        head, where, meta["layer"], meta["n_heads"], meta["head_dim"], meta["d_out"]
    )


def edits(
    state: dict[str, torch.Tensor], meta: dict, edit: Edit, values: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The program's inputs for ``values`` (n * draws, width) on ``edit``'s head columns: the
    kind's function is affine in the head's output, ``fn(z, v) = keep * z + add``, so ``keep`` is
    ``fn(1, 0)`` and ``add`` is ``fn(0, v)`` (:data:`headperturb.model.hooks.KEEP` values: keep 1,
    add 0); rows are prompt-major, draw-minor."""
    rows = values.shape[0]
    draws = rows // state["z"].shape[0]

    def per_draw(x: torch.Tensor) -> torch.Tensor:  # (n, k) -> (n * draws, 1, k)
        return x.float().repeat_interleave(draws, dim=0)[:, None, :]

    resid, z = per_draw(state["resid"]), per_draw(state["z"])
    keep_in, add_in = torch.ones_like(z), torch.zeros_like(z)
    keep_out = torch.ones(rows, 1, meta["d_out"])
    add_out = torch.zeros(rows, 1, meta["d_out"])
    keep, add = (keep_in, add_in) if edit.where == "o_proj_input" else (keep_out, add_out)
    cols = columns(meta, edit.head, edit.where)
    values = values.float()
    missing = hooks.kept(values)  # a segment without the final position: nothing to edit
    zeros, ones = torch.zeros_like(values), torch.ones_like(values)
    add[:, 0, cols] = torch.where(missing, 0.0, edit.fn(zeros, values))
    keep[:, 0, cols] = torch.where(missing, 1.0, edit.fn(ones, zeros))
    return resid, z, keep_in, add_in, keep_out, add_out


def final_outputs(state: dict[str, torch.Tensor], cols: slice, where: str) -> list[torch.Tensor]:
    """The head's clean output at each prompt's final position, (1, width) each, from one
    layer's final state (:func:`layer_state`); ``cols`` are the head's columns at ``where``."""
    key = "z" if where == "o_proj_input" else "out"
    return [row[None].clone() for row in state[key][:, cols].float()]


def final_values(state: dict[str, torch.Tensor], prompt_ids: list[int], edit: Edit) -> torch.Tensor:
    """(n * draws, width): the edit's values at each prompt's final position, prompt-major: the
    final row of what the reference method applies to the whole prompt."""
    rows = []
    for i, (pid, length) in enumerate(zip(prompt_ids, state["n_tokens"].tolist())):
        rows.append(edit.for_prompt(i, pid, int(length))[:, -1, :].expand(edit.draws, -1))
    return torch.cat(rows)


@torch.inference_mode()
def perturbed(
    program,
    state: dict[str, torch.Tensor],
    prompt_ids: list[int],
    meta: dict,
    edit: Edit,
    device="cpu",
) -> np.ndarray:
    """(n, draws, 2) verbalizer logits with ``edit`` applied to the last layer: every prompt and
    draw in one call of ``program``. ``state`` is the last layer's (:func:`layer_state`)."""
    v = final_values(state, prompt_ids, edit)
    inputs = [x.to(device) for x in edits(state, meta, edit, v)]
    logits = program(*inputs)
    return logits.float().cpu().numpy().reshape(len(prompt_ids), edit.draws, 2).astype(np.float64)
