"""One head job: the pass its method, layer and positions call for, and its result file.

A job travels as one :class:`headperturb.spec.Job`. :func:`perturb` resolves its noise (relative
noise reads the head's RMS), runs it, and writes one row per (draw, prompt) with the job's settings
in front and in the file's metadata (:mod:`headperturb.tensors`), which the aggregation checks
against the run's config. Which pass runs:

- the baseline's exported last layer (:mod:`headperturb.tail`), for a fast last-layer job: torch
  alone, no transformers, no other weights;
- otherwise the model (:mod:`headperturb.passes`): the naive reference, the last layer from its
  final state, the final position from the recorded keys and values (``positions: last``), or
  every position from the recorded layer input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from . import io, resources, scoring
from .intervention import Edit
from .sites import HeadSite
from .spec import Job
from .steps import ModelSpec, PromptFiles, gpu_memory_hint, load_engine, prompt_ids

log = logging.getLogger("headperturb")


@dataclass(frozen=True)
class JobInputs:
    """What a head job reads: the prompts, and what its pass starts from (the baseline's final
    state and exported last layer, a recorded layer input, the recorded keys and values; none for
    the naive method) and the head RMS (relative noise)."""

    prompts: PromptFiles
    state: str | None = None
    program: str | None = None
    activations: str | None = None
    cache: str | None = None
    rms: str | None = None


@dataclass
class Result:
    """The logits of one job, (n, draws, 2), and what produced them."""

    prompt_ids: list[int]
    labels: np.ndarray
    logits: np.ndarray
    model_info: dict
    device: str
    engine: str  # "program" or "model"


def head_rms(rms_path, site: str, layer: int, head: int) -> float:
    import pyarrow.parquet as pq

    rms = pq.ParquetFile(rms_path).read().to_pydict()
    found = [v for s_, l_, h_, v in zip(rms["site"], rms["layer"], rms["head"], rms["rms"])
             if (s_, l_, h_) == (site, layer, head)]  # fmt: skip
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


def make_edit(job: Job, site: HeadSite, width: int, clean=None) -> Edit:
    """The edit ``job`` applies to ``site``: its perturbation's values, mode and draws."""
    t, pert = job.target, job.perturbation
    values = pert.values(seed=job.seed, layer=t.layer, head=t.head, width=width,
                         repeats=job.repeats, clean=clean)  # fmt: skip
    return Edit(site, t.head, t.site, values, pert.mode, job.draws, t.position)


def perturb(job: Job, inputs: JobInputs, model: ModelSpec, out_path) -> dict:
    """Score every prompt with one head perturbed, every draw; write and return the columns."""
    job = resolve(job, inputs.rms)
    result = None
    if job.method == "fast" and inputs.program:
        result = with_program(job, inputs, model)
    if result is None:
        result = with_model(job, inputs, model)
    return write(out_path, job, inputs, result)


def _labels(prompts_path) -> tuple[list[int], np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(prompts_path, columns=["prompt_id", "label"])
    return table.column("prompt_id").to_pylist(), np.asarray(table.column("label").to_pylist())


def with_program(job: Job, inputs: JobInputs, model: ModelSpec) -> Result | None:
    """A last-layer job on the baseline's exported last layer: torch and pyarrow only, every
    prompt and draw in one call. None when there is no program for this job's device."""
    from . import models, tail

    models.set_threads(model.threads)
    device = models.resolve_device(model.device)
    program, meta = resources.program(inputs.program, device)
    if program is None:
        log.info("last-layer program not used: %s; loading the model", meta)
        return None
    t = job.target
    if meta["layer"] != t.layer:
        raise ValueError(f"the program in {inputs.program} is layer {meta['layer']}, not {t.layer}")
    from .engine import FINAL_STATE_KEYS

    keys = tuple(f"{k}.{t.layer}" for k in FINAL_STATE_KEYS) + ("n_tokens",)
    state = tail.layer_state(resources.tensors(inputs.state, keys), t.layer)
    pids, labels = _labels(inputs.prompts.prompts)
    if len(pids) != len(state["n_tokens"]):
        raise ValueError(f"{inputs.state} holds {len(state['n_tokens'])} prompts, not {len(pids)}")
    cols = tail.columns(meta, t.head, t.site)
    clean = None
    if job.perturbation.needs_clean:
        clean = tail.final_outputs(state, cols, t.site)
    site = HeadSite(t.layer, "", meta["n_heads"], meta["head_dim"], False)
    edit = make_edit(job, site, cols.stop - cols.start, clean)
    logits = gpu_memory_hint(tail.perturbed, program, state, pids, meta, edit, device)
    model_info = io.read_json(f"{model.path}/{models.INFO_FILE}")
    return Result(pids, labels, logits, model_info, device, "program")


def with_model(job: Job, inputs: JobInputs, model: ModelSpec) -> Result:
    """Any job on the model: the pass its method, layer and positions call for."""
    from . import passes, tail
    from .intervention import site_slice

    engine, sites, model_info, _info = load_engine(inputs.prompts, model)
    t = job.target
    site, last = sites[t.layer], t.layer == len(sites) - 1
    ids, pids, labels = prompt_ids(inputs.prompts.prompts)
    cols = site_slice(engine.model, site, t.head, t.site)
    fast = job.method == "fast"
    state = resources.tensors(inputs.state) if fast and (last or t.position == "last") else None
    captured = resources.tensors(inputs.activations) if fast and state is None else None
    clean = None
    if job.perturbation.needs_clean:
        if state is not None:
            clean = tail.final_outputs(tail.layer_state(state, t.layer), cols, t.site)
        else:
            clean = passes.clean_outputs(engine, ids, site, t.head, t.site, captured)
            clean = [c[-1:] for c in clean] if t.position == "last" else clean
    edit = make_edit(job, site, cols.stop - cols.start, clean)
    progress = _progress(len(ids), job)
    if not fast:
        logits = gpu_memory_hint(passes.naive, engine, ids, pids, edit, progress)
    elif last:
        logits = gpu_memory_hint(
            passes.last_layer, engine, tail.layer_state(state, t.layer), pids, edit
        )
    elif t.position == "last":
        kv = resources.tensors(inputs.cache)
        logits = gpu_memory_hint(passes.final_position, engine, state, kv, pids, edit)
    else:
        logits = gpu_memory_hint(passes.from_layer, engine, captured, ids, pids, edit, progress)
    return Result(pids, labels, logits, model_info, str(engine.device), "model")


def _progress(total: int, job: Job):
    from .logs import Progress

    return Progress(total, job.describe(), log)


def write(out_path, job: Job, inputs: JobInputs, result: Result) -> dict[str, np.ndarray]:
    """Write one row per (draw, prompt) with the job's settings in front; return the columns."""
    from . import tensors

    info = io.read_json(inputs.prompts.info)
    offset = float(info.get("calibration", {}).get("offset", 0.0))
    n, draws = result.logits.shape[:2]
    per_draw = [
        scoring.per_prompt_columns(
            result.prompt_ids,
            result.labels,
            result.logits[:, d, :],
            offset,
            f"{job.describe()}, draw {d}",
        )  # fmt: skip
        for d in range(draws)
    ]
    settings = job.settings()
    columns = {key: np.repeat(np.asarray([settings[key]]), n * draws)
               for key in ("site", "position", "kind", "scale", "layer", "head", "noise_mode",
                           "sigma", "seed")}  # fmt: skip
    columns["draw"] = np.repeat(np.arange(draws, dtype=np.int64), n)
    for key in scoring.PER_PROMPT_COLUMNS:
        columns[key] = np.concatenate([d[key] for d in per_draw])
    stored = {"step": "perturbation", **settings, "calibration_offset": offset,
              "prompts_sha256": tensors.file_digest(inputs.prompts.info)}  # fmt: skip
    meta = tensors.provenance(result.model_info, result.device, stored)
    meta.update(method=job.method, engine=result.engine)
    io.write_parquet(out_path, columns, meta)
    correct = columns["correct"].reshape(draws, n).mean(axis=1)
    log.info("%s: accuracy per draw %s", job.describe(), ", ".join(f"{a:.4f}" for a in correct))
    return columns
