"""One head job, top to bottom: its plan, its pass and its result file.

A job travels as one :class:`headperturb.core.spec.Job`. :func:`perturb` resolves its noise
(relative noise reads the head's RMS), asks :func:`headperturb.core.plans.plan` for its pass,
runs it (:func:`headperturb.model.run.run`) and writes one row per (draw, prompt) with the job's
settings in front and in the file's metadata (:mod:`headperturb.model.recordings`), which the
aggregation checks against the run's config.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from headperturb.analysis import scoring
from headperturb.core import files
from headperturb.core.plans import plan
from headperturb.core.spec import Job
from headperturb.model.context import JobInputs, ModelSpec
from headperturb.model.run import run
from headperturb.model.target import Result, Target

log = logging.getLogger("headperturb")


def head_rms(rms_path, site: str, layer: int, head: int) -> float:
    rms = files.read_columns(rms_path)
    found = [
        v
        for s_, l_, h_, v in zip(rms["site"], rms["layer"], rms["head"], rms["rms"])
        if (s_, l_, h_) == (site, layer, head)
    ]
    if len(found) != 1:
        raise ValueError(f"{rms_path} holds no RMS for {site} layer {layer} head {head}")
    return float(found[0])


def resolve(job: Job, rms_path=None) -> Job:
    """``job`` with its noise's sigma set (relative noise reads the head's RMS)."""
    pert = job.perturbation
    if not hasattr(pert, "resolve"):
        return job
    t = job.target
    rms = head_rms(rms_path, t.site, t.layer, t.head) if pert.noise_mode == "relative" else None
    return replace(job, perturbation=pert.resolve(rms))


def target(job: Job) -> Target:
    """What ``job`` perturbs: its head, with its perturbation, seed and draws."""
    t = job.target
    return Target(
        members=((t.layer, t.head),),
        where=t.site,
        position=t.position,
        perturbation=job.perturbation,
        seed=job.seed,
        repeats=job.repeats,
        what=job.describe(),
    )


def perturb(job: Job, inputs: JobInputs, model: ModelSpec, out_path) -> dict:
    """Score every prompt with one head perturbed, every draw; write and return the columns."""
    from headperturb.model import loading

    job = resolve(job, inputs.rms)
    n_layers = int(files.read_json(f"{model.path}/{loading.INFO_FILE}")["n_layers"])
    job_plan = plan(job.target, job.method, n_layers, repeats=job.repeats)
    return write(out_path, job, inputs, run(job_plan, target(job), inputs, model))


def write(out_path, job: Job, inputs: JobInputs, result: Result) -> dict[str, np.ndarray]:
    """Write one row per (draw, prompt) with the job's settings in front; return the columns."""
    from headperturb.model import recordings

    info = files.read_json(inputs.prompts.info)
    offset = float(info.get("calibration", {}).get("offset", 0.0))
    n, draws = result.logits.shape[:2]
    per_draw = [
        scoring.per_prompt_columns(
            result.prompt_ids,
            result.labels,
            result.logits[:, d, :],
            offset,
            f"{job.describe()}, draw {d}",
        )
        for d in range(draws)
    ]
    settings = job.settings()
    columns = {
        key: np.repeat(np.asarray([settings[key]]), n * draws)
        for key in (
            "site",
            "position",
            "kind",
            "scale",
            "layer",
            "head",
            "noise_mode",
            "sigma",
            "seed",
        )
    }
    columns["draw"] = np.repeat(np.arange(draws, dtype=np.int64), n)
    for key in scoring.PER_PROMPT_COLUMNS:
        columns[key] = np.concatenate([d[key] for d in per_draw])
    if result.partner_ids is not None:  # the paired kinds: whose prompt the row was paired with
        columns["partner_id"] = np.tile(np.asarray(result.partner_ids, dtype=np.int64), draws)
    stored = {
        "step": "perturbation",
        **settings,
        "calibration_offset": offset,
        "prompts_sha256": recordings.file_digest(inputs.prompts.info),
    }
    meta = recordings.provenance(result.model_info, result.device, stored)
    meta.update(method=job.method, engine=result.engine)
    files.write_parquet(out_path, columns, meta)
    correct = columns["correct"].reshape(draws, n).mean(axis=1)
    log.info("%s: accuracy per draw %s", job.describe(), ", ".join(f"{a:.4f}" for a in correct))
    return columns
