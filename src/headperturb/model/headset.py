"""One set job: several heads perturbed together (a point of a joint-ablation curve,
:class:`headperturb.core.sets.SetJob`), top to bottom.

The set's heads are the members of :meth:`~headperturb.core.sets.SetJob.members` under the
order's ranking (``sets/.../ranking.parquet``). Every member gets the edit its kind gives a single
head (:mod:`headperturb.core.kinds`), all at once (:class:`headperturb.model.hooks.EditSet`), by
the pass :func:`headperturb.core.plans.plan` names for the set, from the lowest member's layer
(:func:`headperturb.model.run.run`):

- ``positions: last``: the final token alone through the layers from the lowest member's up,
  attending to the recorded keys and values; mean ablation and patching take each member's
  clean final-position output from the baseline's final state;
- ``positions: all``: every position through the layers from the lowest member's up, from the
  residual stream recorded entering it, the demonstrations once per job (once per prompt length
  for mean ablation, which first averages every member's clean output over the prompts in one
  pass); patching runs each prompt beside its partner in one batch and copies the members'
  outputs across, since storing the partner's output of every member at every position would
  not fit in memory for large sets.

``method: naive`` runs full forward passes with every member's hook instead (the reference).
"""

from __future__ import annotations

import logging

import numpy as np

from headperturb.analysis import scoring
from headperturb.core import files
from headperturb.core.kinds import build
from headperturb.core.plans import plan
from headperturb.core.sets import SET_KINDS, SetJob
from headperturb.model.context import JobInputs, ModelSpec
from headperturb.model.run import run
from headperturb.model.target import Result, Target

log = logging.getLogger("headperturb")


def perturb_set(
    job: SetJob,
    members: list[tuple[int, int]],
    inputs: JobInputs,
    model: ModelSpec,
    out_path,
    method: str = "fast",
    meta: dict | None = None,
) -> dict:
    """Score every prompt with ``members`` perturbed together; write and return the columns."""
    from headperturb.model import loading

    if job.kind not in SET_KINDS:
        raise ValueError(
            f"kind {job.kind!r} cannot perturb a set of heads; allowed: {', '.join(SET_KINDS)}"
        )
    if not members:
        raise ValueError(f"{describe(job)}: the set has no heads")
    n_layers = int(files.read_json(f"{model.path}/{loading.INFO_FILE}")["n_layers"])
    lowest = min(layer for layer, _ in members)
    job_plan = plan(job, method, n_layers, lowest=lowest)
    result = run(job_plan, target(job, members), inputs, model)
    return write(out_path, job, members, inputs, result, method=method, meta=meta)


def target(job: SetJob, members: list[tuple[int, int]]) -> Target:
    """What ``job`` perturbs: ``members`` together, with its kind, one draw."""
    return Target(
        members=tuple(members),
        where=job.site,
        position=job.position,
        perturbation=build(job.kind),
        is_set=True,
        what=describe(job),
    )


def describe(job: SetJob) -> str:
    what = {
        "remove": f"top {job.k} removed",
        "keep": f"top {job.k} kept",
        "single": f"rank {job.k} alone",
    }[job.mode]
    return f"set {job.order_name} {what}, {job.kind} at {job.position} position(s)"


def write(
    out_path,
    job: SetJob,
    members,
    inputs: JobInputs,
    result: Result,
    *,
    method: str,
    meta: dict | None = None,
) -> dict:
    """One row per prompt with the set's settings in front and its members in the metadata."""
    from headperturb.model import recordings

    info = files.read_json(inputs.prompts.info)
    offset = float(info.get("calibration", {}).get("offset", 0.0))
    columns = scoring.per_prompt_columns(
        result.prompt_ids,
        result.labels,
        result.logits[:, 0, :],
        offset,
        describe(job),
        context_free=True,
    )
    n = len(result.prompt_ids)
    settings = set_settings(job, len(members))
    front = {key: np.repeat(np.asarray([value]), n) for key, value in settings.items()}
    front["draw"] = np.zeros(n, dtype=np.int64)
    columns = {**front, **columns}
    if result.partner_ids is not None:
        columns["partner_id"] = np.asarray(result.partner_ids, dtype=np.int64)
    stored = {
        "step": "perturb_set",
        **settings,
        "method": method,
        "calibration_offset": offset,
        "members": [f"L{layer}H{head}" for layer, head in members],
        "prompts_sha256": recordings.file_digest(inputs.prompts.info),
        **(meta or {}),
    }
    provenance = recordings.provenance(result.model_info, result.device, stored)
    files.write_parquet(out_path, columns, provenance)
    log.info("%s: %d heads, accuracy %.4f", describe(job), len(members), columns["correct"].mean())
    return columns


def set_settings(job: SetJob, n_members: int) -> dict:
    """The settings stored in every row of a set's file (and its metadata)."""
    return {
        "site": job.site,
        "position": job.position,
        "kind": job.kind,
        "scale": "",
        "noise_mode": "",
        "sigma": float("nan"),
        "order": job.order_name,
        "seed": int(job.seed),
        "mode": job.mode,
        "k": int(job.k),
        "n_heads": int(n_members),
    }
