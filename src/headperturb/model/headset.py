"""One set job: several heads perturbed together (a point of a joint-ablation curve,
:class:`headperturb.core.sets.SetJob`), top to bottom.

The set's heads are the members of :meth:`~headperturb.core.sets.SetJob.members` under the
order's ranking (``sets/.../ranking.parquet``). Every member gets the edit its kind gives a single
head (:mod:`headperturb.core.kinds`), all at once (:class:`headperturb.model.hooks.EditSet`), and the
pass starts at the lowest member's layer:

- ``positions: last``: the final token alone through the layers from the lowest member's up,
  attending to the recorded keys and values (:func:`headperturb.model.passes.final_position`);
  mean ablation and patching take each member's clean final-position output from the baseline's
  final state;
- ``positions: all``: every position through the layers from the lowest member's up, from the
  residual stream recorded entering it, the demonstrations once per job
  (:func:`headperturb.model.passes.shared_prefix`; once per prompt length for mean ablation); mean
  ablation first averages every member's clean output over the prompts
  (:func:`headperturb.model.gradients.head_means`, one pass with the shared prefix computed once);
  patching runs each prompt beside its partner in one batch and copies the members' outputs
  across (:func:`headperturb.model.passes.partner_patched`), since storing the partner's output of
  every member at every position would not fit in memory for large sets.

``method: naive`` runs full forward passes with every member's hook instead (the reference).
"""

from __future__ import annotations

import logging

import numpy as np

from headperturb import joblog
from headperturb.analysis import scoring
from headperturb.core import files
from headperturb.core.kinds import build
from headperturb.core.sets import SET_KINDS, SetJob
from headperturb.model import cache
from headperturb.model.context import ModelSpec, gpu_memory_hint, load_engine, prompt_ids
from headperturb.model.headjob import JobInputs, recorded, rows_for
from headperturb.model.hooks import Edit, EditSet, site_slice

log = logging.getLogger("headperturb")


def set_edit(job: SetJob, members, engine, sites, rows, state=None, means=None, clean=None):
    """The :class:`EditSet` of ``job`` on ``members`` ((layer, head) pairs): each member's values
    from the baseline's final state (``positions: last``), from the heads' means (``means``, every
    position) or from their clean outputs (``clean[(layer, head)]``, one tensor per prompt: the
    reference in the tests)."""
    from headperturb.model import tail

    pert = build(job.kind)
    edits = []
    for layer, head in members:
        site = sites[layer]
        cols = site_slice(engine.model, site, head, job.site)
        outputs = None
        if clean is not None:
            outputs = clean[(layer, head)]
        elif pert.needs_clean and job.position == "last":
            outputs = tail.final_outputs(tail.layer_state(state, layer), cols, job.site)
        elif pert.needs_clean:  # mean at every position: the mean of one array is itself
            outputs = [means[layer][:, cols]]
        extra = {"donors": rows.donors} if pert.paired else {}
        values = pert.values(seed=0, layer=layer, head=head, width=cols.stop - cols.start,
                             repeats=1, clean=outputs, **extra)  # fmt: skip
        edits.append(
            Edit(site, head, job.site, values, pert.mode, 1, job.position, engine.prefix_len)
        )
    return EditSet(tuple(edits))


def perturb_set(job: SetJob, members: list[tuple[int, int]], inputs: JobInputs, model: ModelSpec,
                out_path, method: str = "fast", meta: dict | None = None) -> dict:  # fmt: skip
    """Score every prompt with ``members`` perturbed together; write and return the columns."""
    from headperturb.model import gradients, passes
    from headperturb.model.hooks import AT_SITE

    if job.kind not in SET_KINDS:
        raise ValueError(
            f"kind {job.kind!r} cannot perturb a set of heads; allowed: {', '.join(SET_KINDS)}"
        )
    if not members:
        raise ValueError(f"{describe(job)}: the set has no heads")
    engine, sites, model_info, _info = load_engine(inputs.prompts, model)
    ids, pids, labels = prompt_ids(inputs.prompts.prompts)
    pert = build(job.kind)
    pairs = files.read_columns(inputs.pairs, ["prompt_id", "partner_id"]) if pert.paired else None
    rows = rows_for(pert, pids, pairs, str(inputs.pairs))
    run_ids, run_pids = [ids[k] for k in rows.run], [pids[k] for k in rows.prompt]
    lowest = sites[min(layer for layer, _ in members)]
    progress = joblog.Progress(len(run_ids), describe(job), log)
    if method == "naive":
        clean = None
        if pert.needs_clean:
            clean = {(layer, head): passes.clean_outputs(engine, ids, sites[layer], head, job.site)
                     for layer, head in members}  # fmt: skip
            if job.position == "last":
                clean = {key: [c[-1:] for c in value] for key, value in clean.items()}
        edit = set_edit(job, members, engine, sites, rows, clean=clean)
        logits = gpu_memory_hint(passes.naive, engine, run_ids, run_pids, edit, progress)
    elif job.position == "last":
        state = cache.cached_tensors(
            inputs.state, None, recorded("baseline", inputs, model_info, len(ids))
        )
        kv = cache.cached_tensors(
            inputs.cache, None, recorded("capture_cache", inputs, model_info, len(ids))
        )
        edit = set_edit(job, members, engine, sites, rows, state=state)
        logits = gpu_memory_hint(
            passes.final_position, engine, state, kv, run_pids, edit, runs=rows.run
        )
    else:
        expect = recorded("capture_layer", inputs, model_info, len(ids), layer=lowest.layer)
        captured = cache.cached_tensors(inputs.activations, None, expect)
        if pert.paired:
            by_site: dict = {}
            for layer, head in members:
                by_site.setdefault(sites[layer], []).append(
                    site_slice(engine.model, sites[layer], head, job.site)
                )
            logits = gpu_memory_hint(passes.partner_patched, engine, captured, run_ids, AT_SITE[job.site],
                                     by_site, rows.run, rows.donors, progress)  # fmt: skip
        else:
            means = None
            if pert.needs_clean:
                layers = sorted({layer for layer, _ in members})
                means = gpu_memory_hint(gradients.head_means, engine, ids, [sites[lay] for lay in layers],
                                        where=job.site)  # fmt: skip
            edit = set_edit(job, members, engine, sites, rows, means=means)
            keys = [pert.prefix_key(len(x)) for x in run_ids]  # one edited prefix per group
            logits = gpu_memory_hint(passes.shared_prefix, engine, captured, run_ids, run_pids,
                                     edit, keys, progress, runs=rows.run)  # fmt: skip
    partners = None if rows.partner is None else [int(pids[k]) for k in rows.partner]
    return write(out_path, job, members, inputs, [int(pids[k]) for k in rows.prompt],
                 np.asarray(labels)[rows.prompt], logits[:, 0, :], model_info, str(engine.device),
                 method, partners, meta)  # fmt: skip


def describe(job: SetJob) -> str:
    what = {"remove": f"top {job.k} removed", "keep": f"top {job.k} kept",
            "single": f"rank {job.k} alone"}[job.mode]  # fmt: skip
    return f"set {job.order_name} {what}, {job.kind} at {job.position} position(s)"


def write(out_path, job: SetJob, members, inputs: JobInputs, prompt_ids, labels, logits,
          model_info, device, method, partner_ids=None, meta=None) -> dict:  # fmt: skip
    """One row per prompt with the set's settings in front and its members in the metadata."""
    from headperturb.model import recordings

    info = files.read_json(inputs.prompts.info)
    offset = float(info.get("calibration", {}).get("offset", 0.0))
    columns = scoring.per_prompt_columns(prompt_ids, labels, logits, offset, describe(job),
                                         context_free=True)  # fmt: skip
    n = len(prompt_ids)
    settings = set_settings(job, len(members))
    front = {key: np.repeat(np.asarray([value]), n) for key, value in settings.items()}
    front["draw"] = np.zeros(n, dtype=np.int64)
    columns = {**front, **columns}
    if partner_ids is not None:
        columns["partner_id"] = np.asarray(partner_ids, dtype=np.int64)
    stored = {"step": "perturb_set", **settings, "method": method, "calibration_offset": offset,
              "members": [f"L{layer}H{head}" for layer, head in members],
              "prompts_sha256": recordings.file_digest(inputs.prompts.info), **(meta or {})}  # fmt: skip
    files.write_parquet(out_path, columns, recordings.provenance(model_info, device, stored))
    log.info("%s: %d heads, accuracy %.4f", describe(job), len(members), columns["correct"].mean())
    return columns


def set_settings(job: SetJob, n_members: int) -> dict:
    """The settings stored in every row of a set's file (and its metadata)."""
    return {"site": job.site, "position": job.position, "kind": job.kind, "scale": "",
            "noise_mode": "", "sigma": float("nan"), "order": job.order_name, "seed": int(job.seed),
            "mode": job.mode, "k": int(job.k), "n_heads": int(n_members)}  # fmt: skip
